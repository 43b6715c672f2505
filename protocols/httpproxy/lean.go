package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// The upstream client of routed GET and HEAD requests without a body —
// nearly every API read. The exchange writes the request and reads the
// response on its own goroutine, over a pooled keep-alive connection.
// net/http's Transport hands each request to a write goroutine, gets the
// response from a read goroutine and signals the body's end back to it:
// on a proxy that turns a request around in tens of microseconds those
// goroutine switches (each a wake-up of another thread) cost as much as
// the work itself.
//
// Everything else goes through the Transport, which does it well:
// request bodies (written while the response is read), upgrades, routes
// with max_upstream_connections (their bound is in their transport's
// dialer), and requests passed through without a route.
//
// What it keeps of the Transport's behaviour: the same request bytes
// (http.Request.Write is what the Transport writes), the same response
// parsing (http.ReadResponse; 1xx responses other than 101 skipped), a
// response header limit (maxResponseHeaderBytes over all of them), a
// connection reused only once its response was read to the end, framed,
// and followed by nothing, a request retried on another connection when a
// pooled one turns out closed before any byte of the response came (the
// idempotent-request retry of the Transport), idle connections closed
// after leanIdleTimeout and bounded in number, and a request aborted when
// its context ends (the app left, or the proxy is closing).

const (
	leanIdleTimeout        = 90 * time.Second // as the Transport's IdleConnTimeout
	leanMaxIdle            = 1024             // as MaxIdleConns
	leanMaxIdlePerHost     = 256              // as MaxIdleConnsPerHost
	maxResponseHeaderBytes = 1 << 20          // as MaxResponseHeaderBytes
)

// leanEligible reports whether the lean client may send req: a GET or
// HEAD without a body that asks for no upgrade.
func leanEligible(req *http.Request) bool {
	return (req.Method == http.MethodGet || req.Method == http.MethodHead) &&
		(req.Body == nil || req.Body == http.NoBody) && req.ContentLength == 0 &&
		len(req.TransferEncoding) == 0 && len(req.Header["Upgrade"]) == 0
}

// leanClient is the pool and the round trip.
type leanClient struct {
	dialPlain, dialTLS dialFunc

	mu     sync.Mutex
	idle   map[string][]*leanConn // by leanKey; most recently used last
	nIdle  int
	sweep  *time.Timer // closes expired idle connections; nil while none is idle
	closed bool
}

func newLeanClient(dialPlain, dialTLS dialFunc) *leanClient {
	return &leanClient{dialPlain: dialPlain, dialTLS: dialTLS, idle: make(map[string][]*leanConn)}
}

func leanKey(scheme, addr string) string { return scheme + " " + addr }

// leanConn is one upstream connection.
type leanConn struct {
	key  string
	conn net.Conn
	cr   *countingReader // under br: bytes received, the header limit
	br   *bufio.Reader
	bw   *bufio.Writer
	// reused: it served a request before, so a failure before any
	// response byte may be its peer having closed it while idle.
	reused    bool
	idleSince time.Time
}

// countingReader counts what is read through it and fails a read once
// limit (if >= 0) is reached.
type countingReader struct {
	r     io.Reader
	n     int64
	limit int64 // -1: none
}

var errResponseHeaderTooLarge = errors.New("upstream response headers exceed 1 MiB")

func (c *countingReader) Read(p []byte) (int, error) {
	if c.limit >= 0 {
		if c.n >= c.limit {
			return 0, errResponseHeaderTooLarge
		}
		if rest := c.limit - c.n; int64(len(p)) > rest {
			p = p[:rest]
		}
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// roundTrip sends req (leanEligible) to addr over scheme and returns the
// response; its body gives the connection back to the pool once read to
// the end, and closes it if closed before.
func (c *leanClient) roundTrip(req *http.Request, scheme, addr string) (*http.Response, error) {
	ctx := req.Context()
	key := leanKey(scheme, addr)
	for {
		lc, err := c.get(ctx, key, scheme, addr)
		if err != nil {
			return nil, err
		}
		resp, err := c.exchange(ctx, lc, req)
		if err == nil {
			return resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !lc.reused || !lc.staleFailure(err) {
			return nil, err
		}
		// A pooled connection the upstream had closed: the request never
		// got there. GET and HEAD are idempotent: try the next one.
	}
}

// exchange writes req on lc and reads the response head.
func (c *leanClient) exchange(ctx context.Context, lc *leanConn, req *http.Request) (*http.Response, error) {
	stop := context.AfterFunc(ctx, func() { _ = lc.conn.SetDeadline(aLongTimeAgo) })
	before := lc.cr.n
	if err := req.Write(lc.bw); err != nil {
		stop()
		lc.conn.Close()
		return nil, err
	}
	if err := lc.bw.Flush(); err != nil {
		stop()
		lc.conn.Close()
		return nil, err
	}
	lc.cr.limit = lc.cr.n + maxResponseHeaderBytes
	var resp *http.Response
	var err error
	for {
		resp, err = http.ReadResponse(lc.br, req)
		if err != nil || resp.StatusCode < 100 || resp.StatusCode > 199 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
	}
	lc.cr.limit = -1
	if err != nil {
		stop()
		lc.conn.Close()
		if lc.cr.n == before {
			return nil, &noResponseError{err: err}
		}
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// Asked for no upgrade: nothing after this is HTTP.
		stop()
		lc.conn.Close()
		resp.Body = http.NoBody
		return resp, nil
	}
	keep := !resp.Close
	if resp.Body == http.NoBody {
		c.finish(lc, stop, keep)
		return resp, nil
	}
	resp.Body = &leanBody{body: resp.Body, c: c, lc: lc, stop: stop, keep: keep}
	return resp, nil
}

// noResponseError is a request that got not one byte of response.
type noResponseError struct{ err error }

func (e *noResponseError) Error() string { return e.err.Error() }
func (e *noResponseError) Unwrap() error { return e.err }

// staleFailure reports whether err is what a request on a connection the
// peer closed while it was idle gets: nothing at all came back, the write
// or the read found the connection closed.
func (lc *leanConn) staleFailure(err error) bool {
	var nr *noResponseError
	if errors.As(err, &nr) {
		return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
			errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) // the write failed
}

// finish ends a response: the connection goes back to the pool if it may
// carry another request, else it is closed.
func (c *leanClient) finish(lc *leanConn, stop func() bool, keep bool) {
	if !stop() { // the context ended: the deadline is in the past
		keep = false
	}
	if keep && lc.br.Buffered() == 0 {
		lc.reused = true
		c.put(lc)
		return
	}
	lc.conn.Close()
}

// leanBody is a response body on a leanConn.
type leanBody struct {
	body io.ReadCloser
	c    *leanClient
	lc   *leanConn
	stop func() bool
	keep bool
	once sync.Once
}

func (b *leanBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err != nil {
		ok := err == io.EOF
		b.once.Do(func() { b.c.finish(b.lc, b.stop, b.keep && ok) })
	}
	return n, err
}

// Close before the end closes the connection: what is left of the body
// is not read.
func (b *leanBody) Close() error {
	b.once.Do(func() {
		b.stop()
		b.lc.conn.Close()
	})
	return nil
}

// get returns an idle connection for key, most recently used first, or
// dials a new one.
func (c *leanClient) get(ctx context.Context, key, scheme, addr string) (*leanConn, error) {
	c.mu.Lock()
	if list := c.idle[key]; len(list) > 0 {
		lc := list[len(list)-1]
		list[len(list)-1] = nil
		c.idle[key] = list[:len(list)-1]
		if len(list) == 1 {
			delete(c.idle, key)
		}
		c.nIdle--
		c.mu.Unlock()
		return lc, nil
	}
	c.mu.Unlock()
	dial := c.dialPlain
	if scheme == "https" {
		dial = c.dialTLS
	}
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	cr := &countingReader{r: conn, limit: -1}
	return &leanConn{key: key, conn: conn, cr: cr, br: bufio.NewReader(cr), bw: bufio.NewWriter(conn)}, nil
}

// put makes lc idle; past the bounds, the oldest idle connection goes.
func (c *leanClient) put(lc *leanConn) {
	lc.idleSince = time.Now()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		lc.conn.Close()
		return
	}
	var drop *leanConn
	list := append(c.idle[lc.key], lc)
	if len(list) > leanMaxIdlePerHost {
		drop, list = list[0], list[1:]
	} else {
		c.nIdle++
	}
	c.idle[lc.key] = list
	if c.nIdle > leanMaxIdle {
		drop = c.removeOldestLocked()
	}
	if c.sweep == nil {
		c.sweep = time.AfterFunc(leanIdleTimeout, c.expire)
	}
	c.mu.Unlock()
	if drop != nil {
		drop.conn.Close()
	}
}

// removeOldestLocked takes the connection idle longest out of the pool.
func (c *leanClient) removeOldestLocked() *leanConn {
	var oldKey string
	var old *leanConn
	for k, list := range c.idle {
		if old == nil || list[0].idleSince.Before(old.idleSince) {
			oldKey, old = k, list[0]
		}
	}
	if old == nil {
		return nil
	}
	if list := c.idle[oldKey][1:]; len(list) > 0 {
		c.idle[oldKey] = list
	} else {
		delete(c.idle, oldKey)
	}
	c.nIdle--
	return old
}

// expire closes the connections idle for leanIdleTimeout and, if some
// remain, runs again when the oldest of them is due.
func (c *leanClient) expire() {
	now := time.Now()
	var drop []*leanConn
	c.mu.Lock()
	var next time.Time
	for k, list := range c.idle {
		i := 0
		for i < len(list) && now.Sub(list[i].idleSince) >= leanIdleTimeout {
			drop = append(drop, list[i])
			i++
		}
		if i == len(list) {
			delete(c.idle, k)
		} else {
			c.idle[k] = list[i:]
			if due := list[i].idleSince.Add(leanIdleTimeout); next.IsZero() || due.Before(next) {
				next = due
			}
		}
		c.nIdle -= i
	}
	c.sweep = nil
	if !next.IsZero() && !c.closed {
		c.sweep = time.AfterFunc(max(next.Sub(now), time.Second), c.expire)
	}
	c.mu.Unlock()
	for _, lc := range drop {
		lc.conn.Close()
	}
}

// close closes every idle connection; connections still in use are
// closed when their response ends.
func (c *leanClient) close() {
	c.mu.Lock()
	c.closed = true
	idle := c.idle
	c.idle, c.nIdle = map[string][]*leanConn{}, 0
	if c.sweep != nil {
		c.sweep.Stop()
		c.sweep = nil
	}
	c.mu.Unlock()
	for _, list := range idle {
		for _, lc := range list {
			lc.conn.Close()
		}
	}
}

// aLongTimeAgo is a deadline that has passed: reads and writes fail at once.
var aLongTimeAgo = time.Unix(1, 0)
