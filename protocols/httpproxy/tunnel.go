package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/proxy/audit"
)

// tunnel is one CONNECT that credproxy intercepts.
type tunnel struct {
	conn       *clientConn
	route      *route
	host, port string // the CONNECT target, normalized
	scheme     string // "https" (TLS inside) or "http" (cleartext inside)
	// authority is host and port as a URL names them for scheme (no
	// default port), hostPort with the port always: computed once, they
	// spare each request in the tunnel parsing its Host again when it is
	// one of them (innerAuthority).
	authority, hostPort string
	log                 *zap.Logger

	// Set during the TLS handshake (GetConfigForClient), read by requests
	// afterwards.
	sni    string // as the client sent it
	sniBad bool   // it names another host than the CONNECT
}

// innerConn is a tunnel's decrypted stream, served by the inner server.
type innerConn struct {
	net.Conn
	tun *tunnel
	served
}

// h2Preface starts every HTTP/2 connection with prior knowledge (h2c).
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

var (
	rejectConnect = &goproxy.ConnectAction{Action: goproxy.ConnectReject}
	errH2         = errors.New("HTTP/2 with prior knowledge is not supported")
)

// onConnect is goproxy's CONNECT handler: refuse (no route under deny),
// pass through (no route under tunnel) or intercept. Nothing is dialed and
// no certificate is made for a refused host.
func (p *Proxy) onConnect(target string, pctx *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
	x := exchangeFrom(pctx.Req.Context())
	if x == nil {
		pctx.Resp = textResponse(pctx.Req, http.StatusInternalServerError, "credproxy: internal error: request without state", true)
		return rejectConnect, target
	}
	host, port, err := splitAuthority(target, portHTTPS)
	if err != nil {
		x.service = target
		pctx.Resp = x.refuse(http.StatusBadRequest, "bad request", "credproxy: invalid CONNECT target: "+err.Error(), true)
		return rejectConnect, target
	}
	x.host, x.port, x.service = host, port, host
	x.route = p.routes.match(host, port, portHTTPS)
	if err := p.workloadAllows(x.route); err != nil {
		pctx.Resp = x.refuse(http.StatusForbidden, err.Reason, "credproxy: "+err.Msg+"; no tunnel opened", true)
		return rejectConnect, target
	}
	if x.route == nil {
		if p.tunnelDefault {
			return &goproxy.ConnectAction{Action: goproxy.ConnectHijack, Hijack: p.passThrough(x)}, target
		}
		pctx.Resp = x.refuse(http.StatusForbidden, "no route", fmt.Sprintf(
			"credproxy: no route for %s (http.default: deny); no tunnel opened", net.JoinHostPort(host, port)), true)
		return rejectConnect, target
	}
	x.service = x.route.name()
	return &goproxy.ConnectAction{Action: goproxy.ConnectHijack, Hijack: p.intercept(x)}, target
}

// intercept serves a CONNECT to a routed host: 200, then TLS with a
// certificate for the CONNECT host (or cleartext HTTP/1.1), then the
// requests inside on the inner server, until the client or the proxy ends
// the tunnel. It runs on the CONNECT's own goroutine.
func (p *Proxy) intercept(x *exchange) func(*http.Request, net.Conn, *goproxy.ProxyCtx) {
	return func(_ *http.Request, client net.Conn, _ *goproxy.ProxyCtx) {
		t := &tunnel{conn: x.conn, route: x.route, host: x.host, port: x.port, log: x.log}
		start, in0, out0 := time.Now(), x.conn.In.Load(), x.conn.Out.Load()
		_ = client.SetWriteDeadline(time.Now().Add(handshakeTimeout))
		if _, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
			x.log.Debug("client left before the tunnel opened", zap.Error(err))
			return
		}
		p.sessionStarted(x, true)
		err := p.serveTunnel(x, t, client)
		p.sessionEnded(x, true, start, x.conn.In.Load()-in0, x.conn.Out.Load()-out0, err)
	}
}

// serveTunnel secures the tunnel and hands it to the inner server; it
// returns when the inner server is done with it.
func (p *Proxy) serveTunnel(x *exchange, t *tunnel, client net.Conn) error {
	ctx := x.req.Context()
	_ = client.SetDeadline(time.Now().Add(handshakeTimeout))
	br := bufio.NewReader(client)
	first, err := br.Peek(1)
	if err != nil {
		return fmt.Errorf("waiting for the client: %w", err)
	}
	isTLS := first[0] == 0x16 // a TLS handshake record
	if !isTLS && isH2Preface(br) {
		p.refuseH2(x, client)
		return errH2
	}
	conn := newReplayConn(client, peeked(br))
	t.scheme = "http"
	if isTLS {
		t.scheme = "https"
	}
	t.authority, t.hostPort = authority(t.host, t.port, t.scheme), net.JoinHostPort(t.host, t.port)
	if isTLS {
		tc := tls.Server(conn, p.tunnelTLS(t))
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			p.tunnelDenied(x, "client TLS handshake failed", "credproxy: client TLS handshake failed: "+err.Error(), 0)
			return fmt.Errorf("client TLS handshake: %w", err)
		}
		// ALPN offers only http/1.1, but a client may send the h2
		// preface regardless: the decrypted stream gets the check the
		// cleartext one got. The first request has readHeaderTimeout to
		// arrive, as it would on the inner server.
		_ = client.SetReadDeadline(time.Now().Add(readHeaderTimeout))
		stop := context.AfterFunc(p.draining, func() { _ = client.SetReadDeadline(time.Now()) })
		tbr := bufio.NewReader(tc)
		_, err = tbr.Peek(1)
		stop()
		if err != nil {
			if errors.Is(err, io.EOF) || p.draining.Err() != nil {
				return nil // the client left, or the proxy is shutting down, before a request
			}
			return fmt.Errorf("waiting for the first request: %w", err)
		}
		if isH2Preface(tbr) {
			p.refuseH2(x, tc)
			_ = tc.Close()
			return errH2
		}
		conn = newReplayConn(tc, peeked(tbr))
	}
	_ = client.SetDeadline(time.Time{})
	ic := &innerConn{Conn: conn, tun: t, served: newServed()}
	if err := p.innerLn.hand(ctx, ic); err != nil {
		conn.Close()
		return fmt.Errorf("tunnel not served: %w", err)
	}
	<-ic.finished
	return nil
}

// isH2Preface reports whether the stream starts with the HTTP/2 client
// preface. It waits for more than one byte only when the first three are
// "PRI", so an HTTP/1.1 request line shorter than the preface is never
// waited on.
func isH2Preface(br *bufio.Reader) bool {
	if pri, _ := br.Peek(3); string(pri) != "PRI" {
		return false
	}
	pre, _ := br.Peek(len(h2Preface))
	return string(pre) == h2Preface
}

// peeked is what br has buffered, to be replayed.
func peeked(br *bufio.Reader) []byte {
	b, _ := br.Peek(br.Buffered())
	return b
}

// refuseH2 audits and answers an h2 preface in a tunnel: 505, and nothing
// goes upstream.
func (p *Proxy) refuseH2(x *exchange, c net.Conn) {
	p.tunnelDenied(x, reasonProtocol, msgH2NotSupported, http.StatusHTTPVersionNotSupported)
	_ = c.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	writeRawResponse(c, http.StatusHTTPVersionNotSupported, msgH2NotSupported)
}

// tunnelTLS offers only http/1.1 by ALPN (a client that insists on h2 is
// refused in the handshake: credproxy would otherwise have to be bypassed)
// and serves the CONNECT host's certificate, whatever the SNI. An SNI for
// another host is recorded, and every request on the tunnel refused.
//
// Sessions resume: tickets are sealed with the proxy's ticket keys
// (p.tickets, rotated by crypto/tls), so an app that opens a new tunnel
// to the same host skips the certificate and the key exchange's
// signature. A ticket names the tunnel's CONNECT host and port and
// resumes only in a tunnel to the same one. The SNI is read in
// GetConfigForClient, which sees every ClientHello, resumed or not
// (GetCertificate is not called on resumption).
func (p *Proxy) tunnelTLS(t *tunnel) *tls.Config {
	binding := []byte(ticketBinding + net.JoinHostPort(t.host, t.port))
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			if hello.ServerName != "" {
				t.sni = hello.ServerName
				if sni, err := normalizeHost(hello.ServerName); err != nil || sni != t.host {
					t.sniBad = true
				}
			}
			return nil, nil // this config
		},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.certs.get(hello.Context(), t.host)
		},
		WrapSession: func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
			ss.Extra = append(ss.Extra, binding)
			return p.tickets.EncryptTicket(cs, ss)
		},
		UnwrapSession: func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
			ss, err := p.tickets.DecryptTicket(identity, cs)
			if err != nil || ss == nil || !slices.ContainsFunc(ss.Extra, func(b []byte) bool { return bytes.Equal(b, binding) }) {
				return nil, nil // a full handshake
			}
			return ss, nil
		},
	}
}

// ticketBinding starts the SessionState.Extra entry that ties a session
// ticket to its tunnel's CONNECT host and port.
const ticketBinding = "credproxy tunnel "

// passThrough serves a CONNECT to an unrouted host under default: tunnel:
// bytes both ways, untouched, nothing injected.
func (p *Proxy) passThrough(x *exchange) func(*http.Request, net.Conn, *goproxy.ProxyCtx) {
	return func(_ *http.Request, client net.Conn, _ *goproxy.ProxyCtx) {
		addr := net.JoinHostPort(x.host, x.port)
		ctx, cancel := context.WithTimeout(x.req.Context(), dialTimeout)
		up, err := p.passDial(ctx, "tcp", addr)
		cancel()
		if de, ok := asDenied(err); ok {
			p.refuseDestination(x, client, de)
			return
		}
		if err != nil {
			reason, what := classifyUpstream(err)
			msg := fmt.Sprintf("credproxy: upstream %s %s: %v", addr, what, err)
			x.status, x.reason, x.errMsg = http.StatusBadGateway, reason, msg
			_ = client.SetWriteDeadline(time.Now().Add(handshakeTimeout))
			writeRawResponse(client, http.StatusBadGateway, msg)
			return
		}
		defer up.Close()
		start, in0, out0 := time.Now(), x.conn.In.Load(), x.conn.Out.Load()
		_ = client.SetWriteDeadline(time.Now().Add(handshakeTimeout))
		if _, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
			return
		}
		_ = client.SetWriteDeadline(time.Time{})
		p.sessionStarted(x, false)
		err = relay(client, up)
		p.sessionEnded(x, false, start, x.conn.In.Load()-in0, x.conn.Out.Load()-out0, err)
	}
}

// relay copies both ways until both directions end, passing EOF on as a
// half-close; an error in either direction closes both. It returns the
// first error.
func relay(client, up net.Conn) error {
	errc := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		errc <- pipe(up, client)
	}()
	err := pipe(client, up)
	wg.Wait()
	client.Close()
	up.Close()
	if err == nil {
		err = <-errc
	}
	return err
}

// pipe copies src to dst; at src's EOF it half-closes dst, on an error it
// closes both so the other direction ends too.
func pipe(dst, src net.Conn) error {
	_, err := io.Copy(dst, src)
	if err == nil {
		if closeWrite(dst) != nil {
			dst.Close()
		}
		return nil
	}
	dst.Close()
	src.Close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// writeRawResponse writes a plain-text response on a hijacked connection.
func writeRawResponse(c net.Conn, status int, msg string) {
	body := msg + "\n"
	_, _ = io.WriteString(c, "HTTP/1.1 "+strconv.Itoa(status)+" "+http.StatusText(status)+"\r\n"+
		"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: "+
		strconv.Itoa(len(body))+"\r\n\r\n"+body)
}

func (p *Proxy) sessionStarted(x *exchange, intercepted bool) {
	rec := x.record(audit.EventSessionStart)
	rec.Upstream = net.JoinHostPort(x.host, x.port)
	if intercepted {
		rec.Credential = x.route.cfg.Credentials
	}
	p.audit.Record(rec)
	// One info line per session, at its end, carries these too.
	if ce := x.log.Check(zap.DebugLevel, "session started"); ce != nil {
		ce.Write(tunnelFields(x, intercepted)...)
	}
}

// tunnelFields describe a tunnel in its log lines.
func tunnelFields(x *exchange, intercepted bool) []zap.Field {
	cred := ""
	if intercepted {
		cred = x.route.cfg.Credentials
	}
	return []zap.Field{zap.String("service", x.service), zap.String("upstream", net.JoinHostPort(x.host, x.port)),
		zap.Bool("intercepted", intercepted), zap.String("credential", cred)}
}

func (p *Proxy) sessionEnded(x *exchange, intercepted bool, start time.Time, in, out int64, err error) {
	dur := time.Since(start)
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	rec := x.record(audit.EventSessionEnd)
	rec.BytesIn, rec.BytesOut = audit.Int64(in), audit.Int64(out)
	rec.DurationMS = audit.Int64(dur.Milliseconds())
	rec.Error = audit.String(msg)
	p.audit.Record(rec)
	x.log.Info("session ended", append(tunnelFields(x, intercepted), zap.Int64("bytes_in", in), zap.Int64("bytes_out", out),
		zap.Duration("duration", dur), zap.String("error", msg))...)
}

// tunnelDenied audits a tunnel refused after the CONNECT was accepted;
// status is what the client was told, if anything (0: nothing).
func (p *Proxy) tunnelDenied(x *exchange, reason, msg string, status int) {
	rec := x.record(audit.EventDenied)
	rec.Reason = reason
	rec.Error = audit.String(msg)
	rec.Method, rec.Host, rec.Status = http.MethodConnect, x.host, status
	p.audit.Record(rec)
	x.log.Warn("tunnel refused", zap.String("reason", reason), zap.String("error", msg))
}
