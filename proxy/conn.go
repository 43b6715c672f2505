package proxy

import (
	"net"
	"sync/atomic"
)

// CountingConn counts the bytes read from Conn (In) and written to it
// (Out): a session's bytes_in and bytes_out. The counters are pointers,
// so that several connections may add to one count (an HTTP request and
// the WebSocket it turns into).
type CountingConn struct {
	net.Conn
	In, Out *atomic.Int64
}

// NewCountingConn wraps c with counters of its own.
func NewCountingConn(c net.Conn) *CountingConn {
	return &CountingConn{Conn: c, In: new(atomic.Int64), Out: new(atomic.Int64)}
}

func (c *CountingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.In.Add(int64(n))
	return n, err
}

func (c *CountingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.Out.Add(int64(n))
	return n, err
}

// CloseWrite half-closes Conn where it can (TCP, unix sockets), so that
// a relay passes EOF on; on any other connection it does nothing.
func (c *CountingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
