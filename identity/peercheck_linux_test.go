package identity_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/integration/nodetest"
)

// The helper process: a client that connects to $IDENTITY_DIAL and holds
// the connection (or exits at once with IDENTITY_EXIT), or a server in a
// PID namespace of its own ($IDENTITY_SERVE) that checks one peer.
func TestHelperProcess(t *testing.T) {
	switch {
	case os.Getenv("IDENTITY_DIAL") != "":
		c, err := net.Dial("unix", os.Getenv("IDENTITY_DIAL"))
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(1)
		}
		fmt.Println("connected")
		if os.Getenv("IDENTITY_EXIT") != "" {
			os.Exit(0)
		}
		_, _ = c.Read(make([]byte, 1)) // until the test closes it
		os.Exit(0)
	case os.Getenv("IDENTITY_SERVE") != "":
		ln, err := net.Listen("unix", os.Getenv("IDENTITY_SERVE"))
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("listening")
		c, err := ln.Accept()
		if err != nil {
			os.Exit(1)
		}
		pc := &identity.PeerChecker{}
		_, err = pc.Check(c.(*net.UnixConn), os.Getenv("IDENTITY_POD"))
		var pe *identity.PeerError
		if errors.As(err, &pe) {
			_ = json.NewEncoder(os.Stdout).Encode(pe)
		} else {
			fmt.Println("{}")
		}
		os.Exit(0)
	}
}

// dialFrom starts a helper in pod that connects to path; it returns once
// the helper has connected.
func dialFrom(t *testing.T, pod *nodetest.Pod, path string, exitAtOnce bool) *exec.Cmd {
	t.Helper()
	cmd := pod.Command(t, os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "IDENTITY_DIAL="+path)
	if exitAtOnce {
		cmd.Env = append(cmd.Env, "IDENTITY_EXIT=1")
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	buf := make([]byte, 64)
	n, _ := out.Read(buf)
	if !strings.HasPrefix(string(buf[:n]), "connected") {
		t.Fatalf("helper: %q", buf[:n])
	}
	return cmd
}

func listen(t *testing.T) (*net.UnixListener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), ".s.PGSQL.5432")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.UnixListener), path
}

func accept(t *testing.T, ln *net.UnixListener) *net.UnixConn {
	t.Helper()
	_ = ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func wantRefused(t *testing.T, err error, reason, contains string) {
	t.Helper()
	var pe *identity.PeerError
	if !errors.As(err, &pe) || pe.Reason != reason || !strings.Contains(pe.Msg, contains) {
		t.Fatalf("Check error = %v, want %s containing %q", err, reason, contains)
	}
}

// TestPeerCheckAttacks: a connection on pod A's socket passes only from a
// process in pod A's cgroup, still alive and still holding its PID.
func TestPeerCheckAttacks(t *testing.T) {
	nodetest.RequireRoot(t)
	podA := nodetest.NewPod(t, nodetest.NewUID(t))
	podB := nodetest.NewPod(t, nodetest.NewUID(t))
	pc := &identity.PeerChecker{}

	t.Run("pod A's own process", func(t *testing.T) {
		ln, path := listen(t)
		cmd := dialFrom(t, podA, path, false)
		p, err := pc.Check(accept(t, ln), podA.UID)
		if err != nil {
			t.Fatal(err)
		}
		if int(p.PID) != cmd.Process.Pid || p.PodUID != podA.UID || !p.Pidfd {
			t.Errorf("peer = %+v, want PID %d in pod %s through SO_PEERPIDFD", p, cmd.Process.Pid, podA.UID)
		}
	})
	t.Run("pod A's own process, without SO_PEERPIDFD", func(t *testing.T) {
		ln, path := listen(t)
		dialFrom(t, podA, path, false)
		p, err := identity.CheckWithoutPeerPidfd(pc, accept(t, ln), podA.UID)
		if err != nil || p.Pidfd {
			t.Fatalf("peer = %+v, %v; want it admitted on the fallback path", p, err)
		}
	})
	t.Run("pod B dials pod A's socket", func(t *testing.T) {
		ln, path := listen(t)
		dialFrom(t, podB, path, false)
		_, err := pc.Check(accept(t, ln), podA.UID)
		wantRefused(t, err, identity.ReasonPeerMismatch, "another pod's cgroup (pod uid "+podB.UID+")")
	})
	t.Run("a host process", func(t *testing.T) {
		ln, path := listen(t)
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, err = pc.Check(accept(t, ln), podA.UID)
		wantRefused(t, err, identity.ReasonPeerMismatch, "not in a pod's cgroup")
	})
	t.Run("PID reuse into pod A's cgroup", func(t *testing.T) {
		ln, path := listen(t)
		// A process of pod B connects and exits before credproxy accepts.
		x := dialFrom(t, podB, path, true)
		pid := x.Process.Pid
		_ = x.Wait()
		// A process of pod A is started with the very same PID.
		y := reusePID(t, podA, pid)
		if y == nil {
			t.Skip("could not get the PID reused (busy machine)")
		}
		data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if uid, _ := identity.CgroupPodUID(string(data)); uid != podA.UID {
			t.Fatalf("PID %d is not in pod A's cgroup after the reuse: %s", pid, data)
		}
		// A check by PID alone would now admit the connection; the
		// pidfd the kernel took at connect time says otherwise.
		_, err := pc.Check(accept(t, ln), podA.UID)
		wantRefused(t, err, identity.ReasonPeerMismatch, "has exited")
	})
	t.Run("credproxy without hostPID", func(t *testing.T) {
		// credproxy in a PID namespace of its own (no hostPID) sees no
		// PID for a peer outside it: with the check on, refused.
		path := filepath.Join(t.TempDir(), "s")
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), "IDENTITY_SERVE="+path, "IDENTITY_POD="+podA.UID)
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		buf := make([]byte, 4096)
		n, _ := out.Read(buf)
		if !strings.HasPrefix(string(buf[:n]), "listening") {
			t.Fatalf("helper: %q", buf[:n])
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		n, _ = out.Read(buf)
		var pe identity.PeerError
		if err := json.Unmarshal(buf[:n], &pe); err != nil || pe.Reason != identity.ReasonUnattributed || !strings.Contains(pe.Msg, "hostPID") {
			t.Fatalf("check in a PID namespace of its own: %s, want %s mentioning hostPID", buf[:n], identity.ReasonUnattributed)
		}
	})
}

// reusePID starts a process in pod with PID pid, steering the kernel's
// next PID through /proc/sys/kernel/ns_last_pid; nil if other processes
// keep taking it.
func reusePID(t *testing.T, pod *nodetest.Pod, pid int) *exec.Cmd {
	t.Helper()
	for range 200 {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
			t.Skipf("ns_last_pid: %v", err)
		}
		cmd := pod.Command(t, "sleep", "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if cmd.Process.Pid == pid {
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
			return cmd
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	return nil
}
