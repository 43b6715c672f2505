package identity

import (
	"fmt"
	"net"
)

// ClientAddr names the app end of a connection for logs and audit. A unix
// socket peer has no address of its own, so it is named by the socket path.
func ClientAddr(c net.Conn) string {
	if _, ok := c.(*net.UnixConn); ok {
		return "unix:" + c.LocalAddr().String()
	}
	return c.RemoteAddr().String()
}

// Peer identifies the process behind a unix socket connection by its kernel
// credentials (SO_PEERCRED): "uid=1000 gid=1000 pid=4242". It returns "" for
// other connections or when the kernel does not say.
func Peer(c net.Conn) string {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ""
	}
	uid, gid, pid, ok := peerCred(uc)
	if !ok {
		return ""
	}
	return fmt.Sprintf("uid=%d gid=%d pid=%d", uid, gid, pid)
}
