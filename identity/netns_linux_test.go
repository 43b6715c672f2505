package identity_test

import (
	"errors"
	"os"
	"os/exec"
	"testing"

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
