package identity

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

func (pc *PeerChecker) proc(parts ...string) string {
	root := pc.ProcRoot
	if root == "" {
		root = "/proc"
	}
	return filepath.Join(append([]string{root}, parts...)...)
}

// Check returns the connecting process if it is in pod podUID's cgroup.
//
// SO_PEERCRED gives the PID the peer had when it connected. The kernel
// also hands out a pidfd for that very process (SO_PEERPIDFD, Linux 6.5):
// the check reads /proc/<pid>/cgroup only while the pidfd says the PID
// is still that process's, so a process that exited and whose PID was
// reused by one in the pod's cgroup is refused. Without SO_PEERPIDFD the
// check opens a pidfd for the PID itself and refuses a process started
// after the connection was accepted; a PID reused between connect and
// accept is then not caught, which is why credproxy logs which path it
// took. Errors are *PeerError (ErrNoPeerPID inside when the PID is not
// visible).
func (pc *PeerChecker) Check(c *net.UnixConn, podUID string) (PeerProcess, error) {
	var p PeerProcess
	raw, err := c.SyscallConn()
	if err != nil {
		return p, &PeerError{Reason: ReasonUnattributed, Msg: err.Error()}
	}
	var cred *unix.Ucred
	pidfd := -1
	var credErr, pidfdErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil && !pc.noPeerPidfd {
			pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		}
	}); err != nil || credErr != nil {
		return p, &PeerError{Reason: ReasonUnattributed, Msg: fmt.Sprintf("SO_PEERCRED: %v", errors.Join(err, credErr))}
	}
	p.PID, p.UID, p.GID = cred.Pid, cred.Uid, cred.Gid
	if cred.Pid <= 0 {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		return p, &PeerError{Reason: ReasonUnattributed, Msg: ErrNoPeerPID.Error()}
	}
	switch {
	case pc.noPeerPidfd || errors.Is(pidfdErr, unix.ENOPROTOOPT):
		// A kernel without SO_PEERPIDFD: a pidfd for the PID as it is now.
		fd, err := unix.PidfdOpen(int(cred.Pid), 0)
		if err != nil {
			return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("process %d is gone: %v", cred.Pid, err)}
		}
		pidfd = fd
	case pidfdErr != nil:
		// EINVAL or ESRCH: the process that connected has exited.
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("the process that connected (PID %d) has exited: %v", cred.Pid, pidfdErr)}
	default:
		p.Pidfd = true
	}
	defer unix.Close(pidfd)

	// The pidfd's process must still be alive and hold the PID.
	if got, err := pc.pidfdPID(pidfd); err != nil || got != int(cred.Pid) {
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf(
			"the process that connected (PID %d) has exited; the PID may have been reused", cred.Pid)}
	}
	if !p.Pidfd {
		// Fallback: a process started after this check began cannot be
		// the one that connected.
		if started, err := pc.startedAfterBoot(int(cred.Pid)); err == nil && started > pc.nowTicks() {
			return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("PID %d was reused", cred.Pid)}
		}
	}
	content, err := os.ReadFile(pc.proc(strconv.Itoa(int(cred.Pid)), "cgroup"))
	if err != nil {
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("read the cgroup of PID %d: %v", cred.Pid, err)}
	}
	// Still the same process after the read: what was read is its cgroup.
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf(
			"the process that connected (PID %d) exited during the check", cred.Pid)}
	}
	uid, ok := CgroupPodUID(string(content))
	p.PodUID = uid
	switch {
	case !ok:
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("PID %d is not in a pod's cgroup (a host process?)", cred.Pid)}
	case uid != podUID:
		return p, &PeerError{Reason: ReasonPeerMismatch, Msg: fmt.Sprintf("PID %d is in another pod's cgroup (pod uid %s)", cred.Pid, uid)}
	}
	return p, nil
}

// pidfdPID reads the PID a pidfd refers to from /proc/self/fdinfo: -1
// once the process has exited.
func (pc *PeerChecker) pidfdPID(pidfd int) (int, error) {
	data, err := os.ReadFile(pc.proc("self", "fdinfo", strconv.Itoa(pidfd)))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Pid:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("no Pid in the pidfd's fdinfo")
}

// startedAfterBoot is a process's start time in clock ticks since boot
// (/proc/<pid>/stat field 22).
func (pc *PeerChecker) startedAfterBoot(pid int) (uint64, error) {
	data, err := os.ReadFile(pc.proc(strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// comm may hold spaces and parentheses: the fields follow the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 20 {
		return 0, errors.New("malformed stat")
	}
	return strconv.ParseUint(fields[19], 10, 64) // field 22, counted from state (3)
}

// nowTicks is the time since boot in clock ticks (USER_HZ, 100).
func (pc *PeerChecker) nowTicks() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return ^uint64(0)
	}
	return uint64(ts.Sec)*100 + uint64(ts.Nsec)/10_000_000 + 1
}
