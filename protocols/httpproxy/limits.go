package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Bounds on what one app may hold (http.max_connections, idle_timeout,
// body_read_timeout, routes[].max_upstream_connections) and the pass-
// through deny list's answers. Each refusal is counted in the metrics.

// idleTimeout is http.idle_timeout, or its default.
func (p *Proxy) idleTimeout() time.Duration {
	if d := p.cfg.IdleTimeout.D(); d > 0 {
		return d
	}
	return idleTimeout
}

// errTooManyConnections is ServeConn's error for a connection over
// http.max_connections.
var errTooManyConnections = errors.New("httpproxy: too many connections")

// refuseConn answers a connection over http.max_connections with a 503,
// before reading anything, and closes it.
func (p *Proxy) refuseConn(conn net.Conn, sessionID string) error {
	p.refused("", RefusedMaxConnections)
	body := fmt.Sprintf("credproxy: too many connections: http.max_connections %d reached; retry later\n", p.cfg.MaxConnections)
	msg := "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n" +
		"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	if ce := p.log.Check(zap.DebugLevel, "connection refused"); ce != nil {
		ce.Write(zap.String("session_id", sessionID), zap.String("reason", RefusedMaxConnections),
			zap.Int("max_connections", p.cfg.MaxConnections))
	}
	p.limits.Refuse(conn, []byte(msg))
	return errTooManyConnections
}

// roundTrip sends a request upstream: a routed GET or HEAD without a
// body on the lean client (lean.go), unless its route has a
// max_upstream_connections bound; everything else on transportFor's
// transport.
func (p *Proxy) roundTrip(x *exchange, out *http.Request) (*http.Response, error) {
	if r := x.route; r != nil && r.transport == nil && leanEligible(out) {
		return p.lean.roundTrip(out, x.scheme, net.JoinHostPort(x.host, x.port))
	}
	return p.transportFor(x.route).RoundTrip(out)
}

// transportFor is the transport a request goes out on: its route's own
// (max_upstream_connections), the shared one for other routes, or for a
// request passed through (no route, default: tunnel) the one whose dialer
// checks the deny list.
func (p *Proxy) transportFor(r *route) *http.Transport {
	switch {
	case r == nil:
		return p.passTransport
	case r.transport != nil:
		return r.transport
	}
	return p.transport
}

// boundRoute gives a route with max_upstream_connections a transport of
// its own, whose dialer takes a place for each connection it opens; the
// place is given back when the connection closes.
func (p *Proxy) boundRoute(r *route) {
	n := r.cfg.MaxUpstreamConnections
	if n <= 0 {
		return
	}
	r.upstream = make(chan struct{}, n)
	t := p.newTransport(func(ctx context.Context, network, addr string) (net.Conn, error) {
		return p.dialBounded(ctx, r, network, addr)
	})
	t.MaxIdleConns, t.MaxIdleConnsPerHost = n, n
	r.transport = t
}

// UpstreamLimitError is a request that found no free place under its
// route's max_upstream_connections within the dial timeout.
type UpstreamLimitError struct {
	Route string
	Max   int
}

func (e *UpstreamLimitError) Error() string {
	return fmt.Sprintf("route %s is at max_upstream_connections (%d)", e.Route, e.Max)
}

func (p *Proxy) dialBounded(ctx context.Context, r *route, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	select {
	case r.upstream <- struct{}{}:
	default:
		// Idle pooled connections hold places too: let them go, then
		// wait for a place (a request that finishes meanwhile hands its
		// connection to this one through the pool instead).
		r.transport.CloseIdleConnections()
		select {
		case r.upstream <- struct{}{}:
		case <-ctx.Done():
			return nil, &UpstreamLimitError{Route: r.name(), Max: cap(r.upstream)}
		}
	}
	c, err := typedDial(p.dial)(ctx, network, addr)
	if err != nil {
		<-r.upstream
		return nil, err
	}
	return &boundConn{Conn: c, place: r.upstream}, nil
}

// boundConn gives its route's place back when it is closed.
type boundConn struct {
	net.Conn
	place  chan struct{}
	closed atomic.Bool
}

func (c *boundConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		<-c.place
	}
	return err
}

// limitFailure is the answer to an upstream exchange that failed on one
// of credproxy's own bounds, or nil.
func (x *exchange) limitFailure(err error) *http.Response {
	route := ""
	if x.route != nil {
		route = x.route.name()
	}
	var (
		bt *BodyTimeoutError
		ul *UpstreamLimitError
	)
	if cb, ok := x.req.Body.(*countingBody); ok && cb.stalled.Load() && !errors.As(err, &bt) {
		bt = &BodyTimeoutError{After: cb.timeout}
		err = bt
	}
	switch {
	case errors.As(err, &bt):
		x.p.timedOut(route, TimeoutBodyRead)
		return x.refuse(http.StatusRequestTimeout, "body read timeout", "credproxy: "+bt.Error()+"; request ended", true)
	case errors.As(err, &ul):
		x.p.refused(route, RefusedMaxUpstreamConnections)
		return x.refuse(http.StatusServiceUnavailable, "max upstream connections", "credproxy: "+ul.Error()+"; retry later", false)
	}
	if de, ok := asDenied(err); ok {
		x.p.refused("", RefusedDestination)
		return x.refuse(http.StatusForbidden, "destination denied", deniedMessage(x, de), false)
	}
	return nil
}

func deniedMessage(x *exchange, de *DeniedError) string {
	return fmt.Sprintf("credproxy: no pass-through to %s: address %s %s", net.JoinHostPort(x.host, x.port), de.Addr, de.Why)
}

// refuseDestination answers a CONNECT whose destination is denied, on the
// hijacked connection.
func (p *Proxy) refuseDestination(x *exchange, client net.Conn, de *DeniedError) {
	msg := deniedMessage(x, de)
	x.status, x.reason, x.errMsg = http.StatusForbidden, "destination denied", msg
	p.refused("", RefusedDestination)
	_ = client.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	writeRawResponse(client, http.StatusForbidden, msg)
}
