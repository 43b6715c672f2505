package csi

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/credproxy/credproxy/identity"
	"golang.org/x/sys/unix"
)

// TestRepublishAfterRestartKeepsThePodsDirectory: when credproxy restarts
// (a rolling update of the DaemonSet), the kubelet republishes each
// running pod's volume to a plugin that has never seen it. The pod's
// containers keep the bind mount they were started with, so the pod's
// directory must stay the same directory: the new credproxy's sockets
// have to appear in what the pod already has mounted. Needs root (bind
// mounts).
func TestRepublishAfterRestartKeepsThePodsDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: bind mounts")
	}
	state := filepath.Join(t.TempDir(), "pods")
	target := filepath.Join(t.TempDir(), "target", "mount")
	newServer := func() (*Server, *fakeHost) {
		h := &fakeHost{published: map[string]*identity.Workload{}}
		s, err := New(Options{Driver: "csi.credproxy.io", Audience: "credproxy", Node: testNode, StateDir: state, Host: h})
		if err != nil {
			t.Fatal(err)
		}
		return s, h
	}
	req := publishRequest(volumeContext(), map[string]string{ctxTokens: tokens(token("payments", "api", "api-0", podUID, testNode))})
	req.TargetPath = target
	t.Cleanup(func() {
		for unix.Unmount(target, unix.MNT_DETACH) == nil {
		}
	})

	s1, _ := newServer()
	if _, err := s1.NodePublishVolume(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	// What the pod's container holds: the mount as it was when it started.
	pod, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()

	// credproxy restarts; the kubelet republishes the running pod's volume.
	s2, h2 := newServer()
	if _, err := s2.NodePublishVolume(t.Context(), req); err != nil {
		t.Fatalf("republish after a restart: %v", err)
	}
	if h2.published[podUID] == nil {
		t.Fatal("the new plugin did not publish the pod")
	}
	// The new credproxy's socket goes into the pod's directory...
	if err := os.WriteFile(filepath.Join(state, podUID, ".s.PGSQL.5432"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// ...which the pod must see through the mount it already has.
	if _, err := os.Stat(fmt.Sprintf("/proc/self/fd/%d/.s.PGSQL.5432", pod.Fd())); err != nil {
		t.Errorf("the pod does not see the new credproxy's socket through its mount: %v", err)
	}
	// The target is mounted once, not stacked.
	if _, err := s2.NodeUnpublishVolume(t.Context(), unpublishRequest(target)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("after unpublish the target is still there (a mount stacked on it?): %v", err)
	}
}
