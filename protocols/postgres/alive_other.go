//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package postgres

import "net"

// connAlive cannot peek at a socket here; a backend that closed while idle
// fails its session's first query instead.
func connAlive(net.Conn) bool { return true }
