package identity

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

func (n *Netns) proc(parts ...string) string {
	root := n.ProcRoot
	if root == "" {
		root = "/proc"
	}
	return filepath.Join(append([]string{root}, parts...)...)
}

// PodNetns opens the network namespace of pod podUID, from a process in
// the pod's cgroup, and returns it with its inode (which tells a
// recreated sandbox's namespace from the old one). The process is held
// with a pidfd while its namespace is opened, so a PID reused meanwhile
// cannot hand over another namespace. A process in credproxy's own
// network namespace or the host's (PID 1's) does not count: a container
// process is in the pod's cgroup a moment before it joins the pod's
// namespace, and a hostNetwork pod has none of its own (ErrHostNetwork).
// While any process of the pod is still in namespace current (the one the
// caller bound in; 0 for none), PodNetns returns current and a nil file:
// nothing changed. ErrNoPodProcess: no process of the pod runs in a
// namespace of its own yet. hint, when not nil, is the PID of a process
// last seen in namespace current: it is checked first, which spares a
// walk of every process on the node while nothing changed, and PodNetns
// updates it.
func (n *Netns) PodNetns(podUID string, current uint64, hint *int) (*os.File, uint64, error) {
	if hint == nil {
		hint = new(int)
	}
	if current != 0 && *hint > 1 && n.stillIn(*hint, podUID, current) {
		return nil, current, nil
	}
	*hint = 0
	entries, err := os.ReadDir(n.proc())
	if err != nil {
		return nil, 0, err
	}
	own := map[uint64]bool{}
	for _, p := range []string{n.proc("self", "ns", "net"), n.proc("1", "ns", "net")} {
		// (os.Stat's Sys() is a *syscall.Stat_t: asserting *unix.Stat_t
		// never matched, and no namespace counted as credproxy's own.)
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err == nil {
			own[st.Ino] = true
		}
	}
	var found *os.File
	var foundIno uint64
	hostOnly := false
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		content, err := os.ReadFile(n.proc(e.Name(), "cgroup"))
		if err != nil {
			continue
		}
		if uid, ok := CgroupPodUID(string(content)); !ok || uid != podUID {
			continue
		}
		f, ino, err := n.open(pid, podUID)
		if err != nil {
			continue // exited meanwhile: try the next
		}
		switch {
		case own[ino]:
			f.Close()
			hostOnly = true
		case current != 0 && ino == current:
			f.Close()
			if found != nil {
				found.Close()
			}
			*hint = pid
			return nil, current, nil
		case found == nil:
			found, foundIno = f, ino
			*hint = pid
		default:
			f.Close()
		}
	}
	switch {
	case found != nil:
		return found, foundIno, nil
	case hostOnly:
		return nil, 0, ErrHostNetwork
	}
	return nil, 0, ErrNoPodProcess
}

// stillIn reports whether process pid is in pod podUID's cgroup and in
// network namespace ino.
func (n *Netns) stillIn(pid int, podUID string, ino uint64) bool {
	content, err := os.ReadFile(n.proc(strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return false
	}
	if uid, ok := CgroupPodUID(string(content)); !ok || uid != podUID {
		return false
	}
	var st unix.Stat_t
	return unix.Stat(n.proc(strconv.Itoa(pid), "ns", "net"), &st) == nil && st.Ino == ino
}

// open opens pid's network namespace while a pidfd holds pid, and checks
// afterwards that pid is still that process and still in the pod.
func (n *Netns) open(pid int, podUID string) (*os.File, uint64, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, 0, err
	}
	defer unix.Close(pidfd)
	f, err := os.Open(n.proc(strconv.Itoa(pid), "ns", "net"))
	if err != nil {
		return nil, 0, err
	}
	content, err := os.ReadFile(n.proc(strconv.Itoa(pid), "cgroup"))
	if err == nil {
		err = unix.PidfdSendSignal(pidfd, 0, nil, 0)
	}
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if uid, ok := CgroupPodUID(string(content)); !ok || uid != podUID {
		f.Close()
		return nil, 0, errors.New("the process left the pod")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, st.Ino, nil
}

// Listen binds a TCP listener on addr inside network namespace ns. The
// socket is created on an OS thread switched into ns and stays in it.
func (n *Netns) Listen(ns *os.File, addr string) (net.Listener, error) {
	return inNetns(ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
}

// Dial connects to addr from inside network namespace ns with d (nil: a
// 5s timeout), as a process in the pod would (for tests and probes).
func (n *Netns) Dial(ns *os.File, d *net.Dialer, network, addr string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{Timeout: 5 * time.Second}
	}
	return inNetns(ns, func() (net.Conn, error) { return d.Dial(network, addr) })
}

// inNetns runs open on an OS thread switched into network namespace ns:
// the socket it creates stays in ns. The thread switches back before it
// is released, and is discarded if it cannot (what open made is then
// closed).
func inNetns[C io.Closer](ns *os.File, open func() (C, error)) (C, error) {
	type result struct {
		c   C
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", unix.Getpid(), unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer self.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("enter the pod's network namespace: %w", err)}
			return
		}
		c, oerr := open()
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked and dies with this goroutine.
			if oerr == nil {
				c.Close()
			}
			ch <- result{err: fmt.Errorf("leave the pod's network namespace: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{c, oerr}
	}()
	r := <-ch
	return r.c, r.err
}
