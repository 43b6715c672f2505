package identity

import (
	"net"
	"syscall"
)

func peerCred(c *net.UnixConn) (uid, gid uint32, pid int32, ok bool) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, 0, false
	}
	var cred *syscall.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || serr != nil {
		return 0, 0, 0, false
	}
	return cred.Uid, cred.Gid, cred.Pid, true
}
