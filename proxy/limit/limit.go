// Package limit bounds what one listener may hold: counters with a
// ceiling, shared by the handlers a reload swaps in and out so the count
// carries over, and the refusal that answers the connection over the
// ceiling without letting it hold anything for long. It is a leaf, like
// audit and credentials: protocols use it, the engine owns one Listener
// per bound address.
package limit

import (
	"io"
	"net"
	"sync/atomic"
	"time"
)

// Counter counts holders against a ceiling given at each call, since a
// reload may change the ceiling while the holders stay.
type Counter struct{ n atomic.Int64 }

// TryAcquire takes a place if fewer than max are taken; max <= 0 means no
// ceiling. It never waits.
func (c *Counter) TryAcquire(max int) bool {
	if max <= 0 {
		c.n.Add(1)
		return true
	}
	for {
		n := c.n.Load()
		if n >= int64(max) {
			return false
		}
		if c.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Release gives back a place taken by TryAcquire.
func (c *Counter) Release() { c.n.Add(-1) }

// InUse is how many places are taken.
func (c *Counter) InUse() int { return int(c.n.Load()) }

// Listener is one listener's counters. The engine keeps it for as long as
// the address is bound, across reloads.
type Listener struct {
	Conns      Counter // HTTP: open app connections
	Handshakes Counter // Postgres: connections not yet handed their session
	Sessions   Counter // Postgres: sessions past their startup packet
	lingering  Counter
}

// Refusals close gracefully: after the answer, the write side is shut and
// what the client already sent is read and dropped for a moment, so that
// closing with unread data does not reset the connection before the
// client reads the answer. At most maxLingering connections linger per
// listener; past that a refused connection is closed at once.
const (
	maxLingering = 64
	lingerFor    = time.Second
	lingerBytes  = 64 << 10
	writeFor     = time.Second
)

// Refuse writes msg to c and closes it. It blocks for at most about two
// seconds (a write, then the linger), on the caller's goroutine, and
// never reads more than lingerBytes.
func (l *Listener) Refuse(c net.Conn, msg []byte) {
	defer c.Close()
	_ = c.SetWriteDeadline(time.Now().Add(writeFor))
	if _, err := c.Write(msg); err != nil {
		return
	}
	release, ok := l.Linger()
	if !ok {
		return
	}
	defer release()
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_ = c.SetReadDeadline(time.Now().Add(lingerFor))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, lingerBytes))
}

// Linger takes one of the listener's few places for a refusal that waits
// on its client (at most maxLingering at once); ok is false when none is
// free, and the refusal must not wait.
func (l *Listener) Linger() (release func(), ok bool) {
	if !l.lingering.TryAcquire(maxLingering) {
		return nil, false
	}
	return l.lingering.Release, true
}

// LingerFor is how long a lingering refusal may wait on its client.
const LingerFor = lingerFor
