package postgres

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgproto3/v2"
)

// Terminating an established session: credproxy ends sessions itself when it
// shuts down and when a credential's lease ends. The app must then get a
// FATAL ErrorResponse, as PostgreSQL sends one (57P01) when it terminates a
// backend. Writing it into the middle of an upstream message would corrupt
// the stream, so the upstream-to-app copy tracks message boundaries and
// writes the FATAL only at one.

// boundaryWait bounds how long a terminating session waits for the upstream
// to finish the message it is in the middle of.
const boundaryWait = time.Second

// msgTracker follows PostgreSQL message framing over a byte stream.
type msgTracker struct {
	hdr  [5]byte
	hdrN int   // header bytes seen of the current message
	body int64 // body bytes still to come
}

// advance consumes p and returns how many bytes it took to reach the first
// message boundary in p (0 when already at one), or -1 when there is none.
func (t *msgTracker) advance(p []byte) int {
	first := -1
	if t.atBoundary() {
		first = 0
	}
	consumed := 0
	for consumed < len(p) {
		if t.body > 0 {
			n := min(int64(len(p)-consumed), t.body)
			t.body -= n
			consumed += int(n)
		} else {
			n := copy(t.hdr[t.hdrN:], p[consumed:])
			t.hdrN += n
			consumed += n
			if t.hdrN == len(t.hdr) {
				t.body = max(int64(binary.BigEndian.Uint32(t.hdr[1:]))-4, 0)
				t.hdrN = 0
			}
		}
		if first < 0 && t.atBoundary() {
			first = consumed
		}
	}
	return first
}

func (t *msgTracker) atBoundary() bool { return t.hdrN == 0 && t.body == 0 }

// terminator carries a termination request to the copy loop.
type terminator struct {
	once   sync.Once
	reason atomic.Pointer[pgproto3.ErrorResponse]
	up     net.Conn
}

// terminate asks the session to end with resp; the copy loop sends it at the
// next message boundary. Only the first request counts.
func (t *terminator) terminate(resp *pgproto3.ErrorResponse) {
	t.once.Do(func() {
		t.reason.Store(resp)
		// Wake the copy loop out of its blocking read.
		_ = t.up.SetReadDeadline(time.Now())
	})
}

// errTerminated is returned by the copy loop after it sent the FATAL.
type errTerminated struct{ resp *pgproto3.ErrorResponse }

func (e *errTerminated) Error() string { return e.resp.Message }

// smallBuf is what an idle session holds while it waits for upstream bytes;
// a full read switches to a large pooled buffer until traffic calms down.
const smallBuf = 2 << 10

var bigBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// copyToClient copies upstream bytes to the app until EOF, an error, or a
// termination request, which it honours at a message boundary. tr is the
// framing state after whatever was already forwarded.
func copyToClient(dst io.Writer, src net.Conn, t *terminator, tr msgTracker) (int64, error) {
	small := make([]byte, smallBuf)
	buf := small
	var big *[]byte
	defer func() {
		if big != nil {
			bigBufs.Put(big)
		}
	}()
	var written int64
	var deadlineExtended bool
	for {
		n, rerr := src.Read(buf)
		data := buf[:n]
		if resp := t.reason.Load(); resp != nil {
			// Forward up to the first boundary, then the FATAL.
			probe := tr
			if k := probe.advance(data); k >= 0 {
				if _, err := dst.Write(data[:k]); err != nil {
					return written, err
				}
				return written + int64(k), sendFatal(dst, resp)
			}
			if !deadlineExtended {
				// Mid-message: let the upstream finish it, briefly.
				deadlineExtended = true
				_ = src.SetReadDeadline(time.Now().Add(boundaryWait))
				if errors.Is(rerr, os.ErrDeadlineExceeded) {
					rerr = nil
				}
			}
		}
		if n > 0 {
			if _, err := dst.Write(data); err != nil {
				return written, err
			}
			written += int64(n)
			tr.advance(data)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return written, nil
			}
			return written, rerr
		}
		// Grow for bulk transfers (COPY TO, large results), shrink when idle.
		switch {
		case n == len(buf) && big == nil:
			big = bigBufs.Get().(*[]byte)
			buf = *big
		case n < len(small) && big != nil:
			bigBufs.Put(big)
			big, buf = nil, small
		}
	}
}

func sendFatal(w io.Writer, resp *pgproto3.ErrorResponse) error {
	b, _ := resp.Encode(nil)
	if c, ok := w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		_ = c.SetWriteDeadline(time.Now().Add(boundaryWait))
	}
	_, err := w.Write(b)
	if err != nil {
		return err
	}
	return &errTerminated{resp: resp}
}
