package identity_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/integration/nodetest"
)

// TestPodNetns finds a pod's network namespace from its processes, says
// "unchanged" while the pod stays in the one bound (through the hint
// without walking the node's processes), and finds the new one when the
// sandbox is recreated.
func TestPodNetns(t *testing.T) {
	nodetest.RequireRoot(t)
	pod := nodetest.NewPod(t, nodetest.NewUID(t))
	n := &identity.Netns{}
	var hint int
	if _, _, err := n.PodNetns(pod.UID, 0, &hint); !errors.Is(err, identity.ErrNoPodProcess) {
		t.Fatalf("no process yet: %v, want ErrNoPodProcess", err)
	}
	pod.AddNetns(t)
	sandbox := pod.Sandbox(t)
	want := inode(t, "/run/netns/"+pod.Netns)
	waitInNetns(t, sandbox.Process.Pid, want)
	f, ino, err := n.PodNetns(pod.UID, 0, &hint)
	if err != nil || f == nil || ino != want || hint != sandbox.Process.Pid {
		t.Fatalf("PodNetns = %v, %d, %v (hint %d); want the sandbox's namespace %d (pid %d)", f, ino, err, hint, want, sandbox.Process.Pid)
	}
	f.Close()
	if f, got, err := n.PodNetns(pod.UID, ino, &hint); f != nil || got != ino || err != nil {
		t.Fatalf("unchanged: PodNetns = %v, %d, %v", f, got, err)
	}
	// A hint that is no process of the pod: the walk finds the sandbox.
	hint = os.Getpid()
	if f, got, err := n.PodNetns(pod.UID, ino, &hint); f != nil || got != ino || err != nil || hint != sandbox.Process.Pid {
		t.Fatalf("with a wrong hint: PodNetns = %v, %d, %v (hint %d)", f, got, err, hint)
	}
	// The sandbox is recreated in a new namespace.
	_ = sandbox.Process.Kill()
	_ = sandbox.Wait()
	pod2 := *pod
	pod2.Netns = pod.Netns + "-2"
	nodetest.Run(t, "ip", "netns", "add", pod2.Netns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", pod2.Netns).Run() })
	sandbox2 := pod2.Sandbox(t)
	waitInNetns(t, sandbox2.Process.Pid, inode(t, "/run/netns/"+pod2.Netns))
	f, got, err := n.PodNetns(pod.UID, ino, &hint)
	if err != nil || f == nil || got == ino || got != inode(t, "/run/netns/"+pod2.Netns) || hint != sandbox2.Process.Pid {
		t.Fatalf("recreated: PodNetns = %v, %d, %v (hint %d)", f, got, err, hint)
	}
	f.Close()
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestPodNetnsHostNetwork: a pod whose processes run in the node's network
// namespace (hostNetwork; here, the test's own) has none of its own, and
// PodNetns must not hand out credproxy's or the node's: a listener bound
// there would take every host process for the pod.
func TestPodNetnsHostNetwork(t *testing.T) {
	nodetest.RequireRoot(t)
	pod := nodetest.NewPod(t, nodetest.NewUID(t))
	pod.Sandbox(t) // no AddNetns: it stays in the test's namespace
	var hint int
	f, ino, err := (&identity.Netns{}).PodNetns(pod.UID, 0, &hint)
	if f != nil {
		f.Close()
	}
	if !errors.Is(err, identity.ErrHostNetwork) {
		t.Fatalf("PodNetns = %d, %v; want ErrHostNetwork, never the node's namespace", ino, err)
	}
}

// waitInNetns waits until process pid has joined network namespace ino
// (ip netns exec joins it a moment after it starts in the pod's cgroup).
func waitInNetns(t *testing.T, pid int, ino uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err == nil && st.Ino == ino {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d never joined network namespace %d", pid, ino)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
