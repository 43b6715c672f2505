package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// connKey carries the net.Conn a request arrived on (a *clientConn on the
// outer server, an *innerConn on the inner one). The connection holds the
// request's *exchange while goproxy's handler chain runs: net/http serves
// a connection's requests one at a time.
type connKey struct{}

// exchange is one request (or one CONNECT) from arrival to the audit
// record. goproxy runs its handlers on the request's goroutine, so an
// exchange needs no lock; only the byte counts are shared with WebSocket
// relay goroutines.
type exchange struct {
	p       *Proxy
	start   time.Time
	conn    *clientConn
	tun     *tunnel // nil for a request on the proxy connection itself
	req     *http.Request
	rw      *respWriter
	log     *zap.Logger
	connect bool // a CONNECT request

	// Inside a tunnel: the request's own authority, checked against the
	// tunnel's in decide.
	innerHost, innerPort, innerScheme string
	innerErr                          error

	// Set by decide.
	route              *route
	service            string
	host, port, scheme string // where the request goes
	handle             *credentials.Handle
	credWait           lazyTimeout // decide's wait for the credential
	slot               bool        // holds a max_concurrent slot
	injected           bool
	placed             []string // what the injector put in the request, for redaction

	// A refusal by credproxy (or an upstream failure it reports).
	status int
	reason string
	errMsg string

	bytesIn, bytesOut atomic.Int64

	// audited is the request's audit record (finish).
	audited struct {
		rec                           audit.Record
		injected                      bool
		bytesIn, bytesOut, durationMS int64
	}
}

// exchangeFrom is the exchange of the request whose context ctx is.
func exchangeFrom(ctx context.Context) *exchange {
	switch c := ctx.Value(connKey{}).(type) {
	case *clientConn:
		return c.x
	case *innerConn:
		return c.x
	}
	return nil
}

// newExchange wraps w and r for one request, and counts r's body; the
// caller makes it the current exchange of r's connection (served.x).
func (p *Proxy) newExchange(w http.ResponseWriter, r *http.Request, c *clientConn, tun *tunnel) *exchange {
	x := &exchange{p: p, start: time.Now(), conn: c, tun: tun, connect: r.Method == http.MethodConnect}
	x.rw = &respWriter{w: w, x: x}
	if tun != nil {
		x.log = tun.log
	} else {
		x.log = p.log.With(zap.String("session_id", c.id), zap.String("client", c.client.Addr))
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = p.newBody(w, r.Body, &x.bytesIn)
	}
	x.req = r
	return x
}

// serveOuter handles a request on the proxy connection: an absolute-form
// request or a CONNECT.
func (p *Proxy) serveOuter(w http.ResponseWriter, r *http.Request) {
	c, ok := r.Context().Value(connKey{}).(*clientConn)
	if !ok {
		http.Error(w, "credproxy: internal error: unknown connection", http.StatusInternalServerError)
		return
	}
	x := p.newExchange(w, r, c, nil)
	c.x = x
	defer func() {
		c.x = nil
		x.finish()
		if x.rw.hijacked != nil {
			c.markFinished()
		}
	}()
	p.gp.ServeHTTP(x.rw, x.req)
}

// serveInner handles a request inside an intercepted tunnel.
func (p *Proxy) serveInner(w http.ResponseWriter, r *http.Request) {
	ic, ok := r.Context().Value(connKey{}).(*innerConn)
	if !ok {
		http.Error(w, "credproxy: internal error: unknown connection", http.StatusInternalServerError)
		return
	}
	t := ic.tun
	x := p.newExchange(w, r, t.conn, t)
	ic.x = x
	defer func() {
		ic.x = nil
		x.finish()
		if x.rw.hijacked != nil {
			ic.markFinished()
		}
	}()
	x.host, x.port, x.service = t.host, t.port, t.route.name()
	if x.connect {
		x.writeRefusal(http.StatusMethodNotAllowed, "bad request", "credproxy: CONNECT inside an intercepted tunnel is not allowed", true)
		return
	}
	// Before goproxy sees it: the URL is rewritten below, and an opaque or
	// asterisk target must not be.
	if status, reason, msg := screen(x.req); status != 0 {
		x.writeRefusal(status, reason, msg, true)
		return
	}
	x.innerHost, x.innerPort, x.innerScheme, x.innerErr = innerAuthority(x.req, t)
	// goproxy wants an absolute URL; it names the tunnel's host, and decide
	// refuses the request unless the request named the same one.
	x.req.URL.Scheme = t.scheme
	x.req.URL.Host = t.authority
	p.gp.ServeHTTP(x.rw, x.req)
}

// innerAuthority is the host a request inside a tunnel is for: its Host
// (which net/http sets from an absolute-form target), with the tunnel's
// default port; an HTTP/1.0 request without Host is for the tunnel's host.
func innerAuthority(r *http.Request, t *tunnel) (host, port, scheme string, err error) {
	scheme = t.scheme
	if r.URL.IsAbs() {
		scheme = strings.ToLower(r.URL.Scheme)
	}
	def := portHTTPS
	if scheme == "http" {
		def = portHTTP
	}
	h := r.Host
	if h == "" || h == t.hostPort || (h == t.authority && scheme == t.scheme) {
		return t.host, t.port, scheme, nil // what splitAuthority would say
	}
	host, port, err = splitAuthority(h, def)
	return host, port, scheme, err
}

// nonProxy answers a request on the proxy listener whose target is not
// an absolute URL: origin-form, "*" (the h2 preface among them) or
// anything else net/http let through.
func (p *Proxy) nonProxy(w http.ResponseWriter, r *http.Request) {
	x := exchangeFrom(r.Context())
	status, reason, msg := screen(r)
	if status == 0 || status == http.StatusBadRequest {
		status, reason, msg = http.StatusBadRequest, reasonBadRequest,
			"credproxy: this is a forward proxy; send absolute URLs (set HTTP_PROXY / HTTPS_PROXY)"
	}
	if x != nil {
		x.service = r.Host
		x.status, x.reason, x.errMsg = status, reason, msg
	}
	writeText(w, status, msg, false)
}

// onRequest is goproxy's request handler: policy. It refuses with a
// response, or hands the request to the exchange's RoundTrip.
func (p *Proxy) onRequest(req *http.Request, pctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
	x := exchangeFrom(req.Context())
	if x == nil {
		return req, textResponse(req, http.StatusInternalServerError, "credproxy: internal error: request without state", true)
	}
	if resp := x.decide(req); resp != nil {
		return req, resp
	}
	pctx.RoundTripper = x
	return req, nil
}

// decide binds the request to a host and a route, takes a max_concurrent
// slot and acquires the credential; or returns the refusal.
func (x *exchange) decide(req *http.Request) *http.Response {
	p := x.p
	var requested string // the scheme the app used
	if t := x.tun; t != nil {
		x.host, x.port, x.route, x.service = t.host, t.port, t.route, t.route.name()
		tunnelAt := net.JoinHostPort(t.host, t.port)
		switch {
		case t.sniBad:
			return x.refuse(http.StatusForbidden, "host mismatch", fmt.Sprintf(
				"credproxy: TLS server name %q does not match the CONNECT host %s; refused", t.sni, tunnelAt), true)
		case x.innerErr != nil:
			return x.refuse(http.StatusBadRequest, "bad request", "credproxy: "+x.innerErr.Error(), true)
		case x.innerHost != t.host || x.innerPort != t.port || x.innerScheme != t.scheme:
			return x.refuse(http.StatusForbidden, "host mismatch", fmt.Sprintf(
				"credproxy: request for %s://%s inside a tunnel to %s; refused", x.innerScheme,
				net.JoinHostPort(x.innerHost, x.innerPort), tunnelAt), true)
		}
		requested = t.scheme
	} else {
		if status, reason, msg := screen(req); status != 0 {
			x.service = req.URL.Host
			return x.refuse(status, reason, msg, true)
		}
		requested = strings.ToLower(req.URL.Scheme)
		def := portHTTP
		switch requested {
		case "http":
		case "https":
			def = portHTTPS
		default:
			return x.refuse(http.StatusBadRequest, "bad request", fmt.Sprintf("credproxy: unsupported URL scheme %q; use http or https", req.URL.Scheme), false)
		}
		host, port, err := splitAuthority(req.URL.Host, def)
		if err != nil {
			return x.refuse(http.StatusBadRequest, "bad request", "credproxy: "+err.Error(), false)
		}
		x.host, x.port, x.service = host, port, host
		x.route = p.routes.match(host, port, def)
		if err := p.workloadAllows(x.route); err != nil {
			return x.refuse(http.StatusForbidden, err.Reason, "credproxy: "+err.Msg, false)
		}
		if x.route == nil {
			if p.tunnelDefault {
				x.scheme = requested
				return nil
			}
			return x.refuse(http.StatusForbidden, "no route", fmt.Sprintf(
				"credproxy: no route for %s (http.default: deny)", net.JoinHostPort(host, port)), false)
		}
		x.service = x.route.name()
	}
	if echoMethod(req.Method) {
		return x.refuse(http.StatusMethodNotAllowed, reasonMethod, fmt.Sprintf(
			"credproxy: %s is not allowed on route %s: the upstream would echo the injected credential", strings.ToUpper(req.Method), x.route.name()), false)
	}
	// No downgrade: only a plain-HTTP request to a route that opted in
	// with upstream: http goes upstream in cleartext.
	x.scheme = "https"
	if requested == "http" {
		if x.route.cfg.Upstream == "http" {
			x.scheme = "http"
		} else if x.port == portHTTP {
			x.port = portHTTPS
		}
	}
	if !x.route.acquire() {
		return x.refuse(http.StatusServiceUnavailable, "max concurrent", fmt.Sprintf(
			"credproxy: route %s is at max_concurrent (%d); retry later", x.route.name(), x.route.cfg.MaxConcurrent), false)
	}
	x.slot = true
	// A credential the store holds comes at once; a fetch is waited for
	// credentialTimeout at most.
	x.credWait = lazyTimeout{parent: req.Context(), d: credentialTimeout}
	h, err := p.creds.Acquire(&x.credWait, x.route.cfg.Credentials)
	x.credWait.stop()
	if err != nil {
		var ue *credentials.UnavailableError
		msg := err.Error()
		if !errors.As(err, &ue) {
			msg = fmt.Sprintf("credential %q unavailable: %v", x.route.cfg.Credentials, err)
		}
		return x.refuse(http.StatusServiceUnavailable, "credential unavailable", "credproxy: "+msg, false)
	}
	x.handle = h
	return nil
}

// RoundTrip implements goproxy.RoundTripper: the upstream exchange. It
// copies the request, strips hop-by-hop and Proxy-* headers (and whatever
// Connection names), pins the URL and Host to the host decide matched,
// injects the credential last, and sends it. Redirects come back to the
// app as they are. It never returns an error: failures become a 502 (or
// 503) the app can read.
func (x *exchange) RoundTrip(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
	out := req.WithContext(req.Context()) // a shallow copy; what differs is replaced
	out.RequestURI = ""
	out.URL = originURL(x.scheme, authority(x.host, x.port, x.scheme), req.URL)
	out.Host = ""
	out.Close = false
	out.Trailer = nil
	out.TransferEncoding = slices.Clone(req.TransferEncoding)
	out.Form, out.PostForm, out.MultipartForm = nil, nil, nil
	wantWS := isWebSocket(req.Header)
	// A header map of its own, without the hop-by-hop headers. The values
	// are the app's slices: injection replaces entries, never a slice's
	// contents.
	out.Header = sanitizedCopy(req.Header, true)

	var echo *echoScrubber
	if x.route != nil {
		if pr := x.route.prepare(x.handle.Credential); pr.set != nil {
			pr.set(out)
			x.placed, echo = pr.placed, pr.echo
		} else {
			fields := x.reveal()
			err := x.route.inject.Inject(out.Context(), out, fields)
			if err != nil {
				clear(fields)
				return x.injectFailure(err), nil
			}
			x.placed = x.route.inject.Placed(out)
			echo = newEchoScrubber(x.route.inject.Uses().pick(fields), x.placed)
			clear(fields)
		}
	}
	resp, err := x.p.roundTrip(x, out)
	if err != nil {
		return x.upstreamFailure(err), nil
	}
	x.injected = x.route != nil
	if resp.StatusCode == http.StatusSwitchingProtocols && !(wantWS && isWebSocket(resp.Header)) {
		resp.Body.Close()
		return x.refuse(http.StatusBadGateway, "upstream error", fmt.Sprintf(
			"credproxy: upstream %s switched protocols to %q, which credproxy does not relay", out.URL.Host, resp.Header.Get("Upgrade")), true), nil
	}
	sanitizeHeaders(resp.Header, resp.StatusCode == http.StatusSwitchingProtocols)
	if echo != nil {
		x.scrubResponse(resp, echo)
	}
	return resp, nil
}

// scrubResponse keeps the injected credential from coming back to the
// app: it scrubs every response header (and the trailers, once the body
// is read), and drops the body of a redirect when the credential is in
// the URL, since that body repeats Location. Other bodies go to the app
// as the upstream sent them (see the README on the query injector).
func (x *exchange) scrubResponse(resp *http.Response, echo *echoScrubber) {
	if names := echo.header(resp.Header); len(names) > 0 {
		if ce := x.log.Check(zapcore.DebugLevel, "upstream echoed the injected credential; scrubbed"); ce != nil {
			ce.Write(zap.String("route", x.route.name()), zap.Strings("headers", names), zap.Int("status", resp.StatusCode))
		}
	}
	if x.route.inject.Kind() == "query" && isRedirect(resp.StatusCode) && x.req.Method != http.MethodHead {
		resp.Body.Close()
		resp.Body, resp.ContentLength, resp.TransferEncoding, resp.Trailer = http.NoBody, 0, nil, nil
		resp.Header.Del("Content-Encoding")
		resp.Header.Set("Content-Length", "0")
		return
	}
	if resp.ContentLength < 0 && resp.StatusCode != http.StatusSwitchingProtocols {
		// Only a body of unknown length (chunked) can end in trailers.
		resp.Body = &trailerScrubber{ReadCloser: resp.Body, resp: resp, s: echo}
	}
}

// reveal returns the credential's values, for injection and for redacting
// a message; callers clear the map when done.
func (x *exchange) reveal() map[string]string { return revealFields(x.handle.Credential) }

func (x *exchange) injectFailure(err error) *http.Response {
	if resp := x.limitFailure(err); resp != nil {
		return resp // a body that stalled while it was being signed
	}
	var ie *injectError
	if !errors.As(err, &ie) {
		ie = &injectError{status: http.StatusServiceUnavailable, reason: "credential unavailable", msg: err.Error()}
	}
	return x.refuse(ie.status, ie.reason, fmt.Sprintf("credproxy: credential %q cannot be injected for %s: %s",
		x.route.cfg.Credentials, x.route.name(), ie.msg), false)
}

// upstreamFailure turns a transport error into a 502 naming the cause
// (the contract's one status for an upstream failure, timeouts included).
func (x *exchange) upstreamFailure(err error) *http.Response {
	if resp := x.limitFailure(err); resp != nil {
		return resp
	}
	reason, what := classifyUpstream(err)
	return x.refuse(http.StatusBadGateway, reason, fmt.Sprintf("credproxy: upstream %s %s: %v",
		net.JoinHostPort(x.host, x.port), what, err), false)
}

// refuse records a refusal (credproxy's own answer) and returns the
// response goproxy writes. closeConn ends the connection after it: used
// when the request broke a tunnel's rules, so nothing pipelined behind it
// is read.
func (x *exchange) refuse(status int, reason, msg string, closeConn bool) *http.Response {
	msg = x.redact(msg)
	x.status, x.reason, x.errMsg = status, reason, msg
	return textResponse(x.req, status, msg, closeConn)
}

// writeRefusal is refuse for a handler that writes directly.
func (x *exchange) writeRefusal(status int, reason, msg string, closeConn bool) {
	msg = x.redact(msg)
	x.status, x.reason, x.errMsg = status, reason, msg
	writeText(x.rw, status, msg, closeConn)
}

// redact removes the credential's values, in every encoding, and what the
// injector placed from a message bound for the app, the log and the audit
// log. Messages are built not to contain them; this makes sure.
func (x *exchange) redact(msg string) string {
	if x.handle == nil {
		return msg
	}
	fields := x.reveal()
	s := newScrubber(fields)
	clear(fields)
	s.add(x.placed...)
	return s.scrub(msg)
}

// textResponse is a short plain-text response naming the cause.
func textResponse(req *http.Request, status int, msg string, closeConn bool) *http.Response {
	body := msg + "\n"
	h := http.Header{
		"Content-Type":           {"text/plain; charset=utf-8"},
		"X-Content-Type-Options": {"nosniff"},
		"Cache-Control":          {"no-store"},
	}
	if closeConn {
		h["Connection"] = []string{"close"}
	}
	return &http.Response{
		StatusCode: status, Status: strconv.Itoa(status) + " " + http.StatusText(status),
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Body: io.NopCloser(strings.NewReader(body)), ContentLength: int64(len(body)),
		Request: req, Close: closeConn,
	}
}

func writeText(w http.ResponseWriter, status int, msg string, closeConn bool) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	if closeConn {
		h.Set("Connection", "close")
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg+"\n")
}

// finish releases what the request held and writes its audit records:
// denied (for a refusal) and request. An accepted CONNECT is audited by
// its tunnel instead.
func (x *exchange) finish() {
	if c := x.rw.hijacked; c != nil {
		c.Close()
	}
	if x.slot {
		x.route.release()
	}
	if x.handle != nil {
		x.handle.Release()
	}
	if x.connect && x.status == 0 && x.tun == nil {
		return
	}
	status := x.status
	if status == 0 {
		status = x.rw.status
	}
	dur := time.Since(x.start)
	method, path := x.req.Method, x.req.URL.Path
	if x.connect {
		path = ""
	}
	host := x.host
	if host == "" {
		host = x.req.Host
	}
	if x.service == "" {
		x.service = host
	}
	p := x.p
	if x.reason != "" {
		rec := x.record(audit.EventDenied)
		rec.Reason = x.reason
		rec.Error = audit.String(x.errMsg)
		rec.Method, rec.Host, rec.Path, rec.Status = method, host, path, status
		p.audit.Record(rec)
		x.log.Warn("request refused", zap.String("reason", x.reason), zap.Int("status", status),
			zap.String("method", method), zap.String("host", host), zap.String("path", path), zap.String("error", x.errMsg))
	}
	// The request record and what its pointers point at live in the
	// exchange: one allocation a request rather than five.
	a := &x.audited
	rec := &a.rec
	*rec = audit.Record{Event: audit.EventRequest, SessionID: x.conn.id, Protocol: protocolName, Service: x.service, Client: x.conn.client,
		Workload: x.conn.workload}
	rec.Method, rec.Host, rec.Path, rec.Status = method, host, path, status
	injected := x.injected
	a.injected = injected
	rec.Injected = &a.injected
	if x.route != nil && x.handle != nil {
		rec.Credential = x.route.cfg.Credentials
	}
	a.bytesIn, a.bytesOut, a.durationMS = x.bytesIn.Load(), x.bytesOut.Load(), dur.Milliseconds()
	rec.BytesIn, rec.BytesOut, rec.DurationMS = &a.bytesIn, &a.bytesOut, &a.durationMS
	p.audit.Record(rec)
	routeName := ""
	if x.route != nil {
		routeName = x.route.name()
	}
	p.request(routeName, status, injected)
	if ce := x.log.Check(zapcore.DebugLevel, "request"); ce != nil {
		ce.Write(zap.String("method", method), zap.String("host", host), zap.String("path", path),
			zap.String("route", routeName), zap.Int("status", status), zap.Bool("injected", injected),
			zap.Int64("bytes_in", *rec.BytesIn), zap.Int64("bytes_out", *rec.BytesOut),
			zap.Duration("duration", dur), zap.Object("headers", redactedHeaders(x.req.Header)))
	}
}

func (x *exchange) record(event string) *audit.Record {
	return &audit.Record{Event: event, SessionID: x.conn.id, Protocol: protocolName, Service: x.service, Client: x.conn.client,
		Workload: x.conn.workload}
}

// redactedHeaders logs header names with every value REDACTED.
type redactedHeaders http.Header

func (h redactedHeaders) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	for k := range h {
		enc.AddString(k, "REDACTED")
	}
	return nil
}
