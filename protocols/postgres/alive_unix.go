//go:build linux || darwin || freebsd || netbsd || openbsd

package postgres

import (
	"crypto/tls"
	"errors"
	"net"
	"syscall"
)

// connAlive reports whether an idle backend's socket is still open with
// nothing to read: a peek that does not wait. Anything there — bytes (a
// FATAL such as idle_session_timeout's, a notice, a TLS alert) or the end
// of the stream — means the backend is not idle as the pool left it.
func connAlive(c net.Conn) bool {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true // not a socket (a test's pipe): nothing to check
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	var buf [1]byte
	err = rc.Read(func(fd uintptr) bool {
		_, _, rerr := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		// Data or the stream's end return without an error.
		alive = errors.Is(rerr, syscall.EAGAIN) || errors.Is(rerr, syscall.EWOULDBLOCK)
		return true // never wait
	})
	return err == nil && alive
}
