package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
)

// clientConn is one app connection. It counts bytes (In, Out), and
// finished is closed once the HTTP server is done with it: when the
// server closed it, or when the handler that hijacked it (a CONNECT, a
// WebSocket) returned.
type clientConn struct {
	*proxy.CountingConn
	id       string
	client   audit.Client
	workload *audit.Workload // DaemonSet mode: the pod

	once     sync.Once
	closeErr error
	served
}

func newClientConn(c net.Conn, id string) *clientConn {
	return &clientConn{CountingConn: proxy.NewCountingConn(c), id: id, served: newServed(),
		client: audit.Client{Addr: identity.ClientAddr(c), Identity: identity.Peer(c)}}
}

// served is closed when an http.Server is done with a connection it was
// handed. ConnState(StateClosed) marks it for connections the server
// closes; a handler that hijacked the connection marks it as it returns.
type served struct {
	finishedOnce sync.Once
	finished     chan struct{}
	// x is the exchange of the request being handled on the connection,
	// set and cleared by the handler (see exchangeFrom).
	x *exchange
}

func newServed() served { return served{finished: make(chan struct{})} }

func (s *served) markFinished() { s.finishedOnce.Do(func() { close(s.finished) }) }

// finisher is implemented by the connections handed to the servers.
type finisher interface{ markFinished() }

// Close closes the connection once.
func (c *clientConn) Close() error {
	c.once.Do(func() { c.closeErr = c.Conn.Close() })
	return c.closeErr
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// replayConn reads bytes already buffered off a connection before reading
// the connection itself: a request parser's or a peek's leftovers.
type replayConn struct {
	net.Conn
	r io.Reader
}

func newReplayConn(c net.Conn, buffered []byte) net.Conn {
	if len(buffered) == 0 {
		return c
	}
	return &replayConn{Conn: c, r: io.MultiReader(bytes.NewReader(bytes.Clone(buffered)), c)}
}

func (c *replayConn) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *replayConn) CloseWrite() error          { return closeWrite(c.Conn) }

// connListener feeds connections to an http.Server: ServeConn and the
// interception tunnels hand them over one at a time.
type connListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnListener() *connListener {
	return &connListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close makes Accept and hand fail from now on.
func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// hand gives c to the server, or fails once the listener is closed or ctx
// ends.
func (l *connListener) hand(ctx context.Context, c net.Conn) error {
	select {
	case l.ch <- c:
		return nil
	case <-l.done:
		return net.ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// respWriter records what the handler chain (goproxy) writes: status and
// body size, and the connection if it hijacks one.
type respWriter struct {
	w      http.ResponseWriter
	x      *exchange
	status int
	// hijacked is the connection handed out by Hijack, closed when the
	// exchange finishes.
	hijacked net.Conn
}

func (rw *respWriter) Header() http.Header { return rw.w.Header() }

func (rw *respWriter) WriteHeader(code int) {
	if rw.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		rw.status = code
	}
	rw.w.WriteHeader(code)
}

func (rw *respWriter) Write(b []byte) (int, error) {
	if rw.status == 0 {
		rw.status = http.StatusOK
	}
	n, err := rw.w.Write(b)
	rw.x.bytesOut.Add(int64(n))
	return n, err
}

// copyBufs are io.Copy buffers for response bodies: goproxy copies every
// body with io.Copy, which would otherwise allocate 32 KiB per request.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// ReadFrom implements io.ReaderFrom with a pooled buffer.
func (rw *respWriter) ReadFrom(src io.Reader) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	return io.CopyBuffer(writerOnly{rw}, src, *bp)
}

// writerOnly hides ReadFrom, so CopyBuffer uses the buffer it is given.
type writerOnly struct{ io.Writer }

func (rw *respWriter) Flush() {
	_ = http.NewResponseController(rw.w).Flush()
}

// Hijack hands out the client connection with anything the server had
// buffered replayed first, so that neither a CONNECT's pipelined
// ClientHello nor a WebSocket's first frame is lost; the returned
// ReadWriter has nothing buffered of its own.
func (rw *respWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(rw.w).Hijack()
	if err != nil {
		return nil, nil, err
	}
	var buffered []byte
	if n := brw.Reader.Buffered(); n > 0 {
		buffered, _ = brw.Reader.Peek(n)
	}
	c := newReplayConn(conn, buffered)
	if !rw.x.connect {
		// What passes through a WebSocket counts as the request's bytes.
		c = &proxy.CountingConn{Conn: c, In: &rw.x.bytesIn, Out: &rw.x.bytesOut}
	}
	rw.hijacked = c
	return c, bufio.NewReadWriter(bufio.NewReader(c), bufio.NewWriter(c)), nil
}

func (rw *respWriter) Unwrap() http.ResponseWriter { return rw.w }

// countingBody counts the request body bytes read from the app and, with
// a timeout, ends the body when no byte arrives for that long: each Read
// moves the connection's read deadline on, so a body that keeps flowing
// is never cut.
type countingBody struct {
	io.ReadCloser
	n       *atomic.Int64
	rc      *http.ResponseController
	timeout time.Duration // 0: none
	// stalled is set when the body timed out: the server cancels the
	// request as its read fails, so the error that reaches the exchange
	// may be the cancellation rather than BodyTimeoutError.
	stalled atomic.Bool
}

// newBody wraps a request body; w is the server's ResponseWriter, through
// which the read deadline is set.
func (p *Proxy) newBody(w http.ResponseWriter, body io.ReadCloser, n *atomic.Int64) *countingBody {
	b := &countingBody{ReadCloser: body, n: n}
	if d := p.cfg.BodyReadTimeout.D(); d > 0 {
		b.rc, b.timeout = http.NewResponseController(w), d
	}
	return b
}

func (b *countingBody) Read(p []byte) (int, error) {
	if b.timeout > 0 {
		_ = b.rc.SetReadDeadline(time.Now().Add(b.timeout))
	}
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	if b.timeout > 0 && err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			b.stalled.Store(true)
			return n, &BodyTimeoutError{After: b.timeout}
		}
		// The body is over: clear the deadline before the server's
		// background read (which watches for the client going away) can
		// hit it and cancel a response that may stream for hours.
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// BodyTimeoutError ends a request whose body stalled.
type BodyTimeoutError struct{ After time.Duration }

func (e *BodyTimeoutError) Error() string {
	return fmt.Sprintf("request body stalled: no data from the app for %s (http.body_read_timeout)", e.After)
}
