// Package httpproxy is credproxy's forward proxy for HTTP_PROXY and
// HTTPS_PROXY clients. Requests for hosts that have a route get the route's
// credential injected (a header, basic auth, a query parameter or an AWS
// SigV4 signature); everything else is refused (http.default: deny) or
// passed through untouched (http.default: tunnel).
//
// HTTPS to a routed host is intercepted: credproxy answers the CONNECT,
// terminates TLS with a certificate for the CONNECT host signed by http.ca
// (issued and cached by certmagic, in memory), and sends each request on to
// the real host over verified TLS. The CONNECT host, the TLS server name and
// every request's Host must agree, or the request is refused: a credential
// only ever reaches the host its route names. Requests go upstream in
// origin-form only (target.go screens what arrives), and what the
// upstream sends back has the injected values scrubbed from its headers
// (echo.go), so the app cannot read the credential back.
//
// The proxy is built on github.com/elazarl/goproxy: its handler chain runs
// every request (plain and intercepted), with credproxy's policy as the
// request handler and credproxy's round tripper doing hygiene, injection and
// the upstream exchange. Connections are served by two net/http servers
// credproxy owns — one for the proxy listener, one for the inside of
// intercepted tunnels — so each connection has an owner that waits for it.
package httpproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/limit"
)

// Refusal reasons and timeout kinds: bounded metric label values.
const (
	RefusedMaxConnections         = "max_connections"
	RefusedMaxUpstreamConnections = "max_upstream_connections"
	RefusedDestination            = "destination_denied"
	TimeoutBodyRead               = "body_read"
)

// Options configure a Proxy.
type Options struct {
	Config      config.HTTP
	Credentials proxy.Credentials
	Audit       audit.Sink
	Logger      *zap.Logger
	Metrics     *proxy.Metrics // nil: not counted

	// DialContext dials upstream hosts, for routed requests and passed-
	// through tunnels alike; nil uses a net.Dialer. Tests set it to send
	// every host to a local server.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)

	// Limits counts the listener's connections against
	// Config.MaxConnections (0: no limit). The engine shares one between
	// the proxies a reload swaps, so the count carries over; nil gives the
	// proxy a counter of its own.
	Limits *limit.Listener

	// OwnAddrs lists the process's listening addresses (the admin
	// server, every service, the proxy's own listener), which default:
	// tunnel never passes through to.
	OwnAddrs func() []net.Addr

	// Workload is the pod this proxy serves in DaemonSet mode: routes it
	// is not allowed are refused, and records carry it. Nil otherwise.
	Workload *proxy.WorkloadPolicy

	// For tests: certificate lifetime and how often certmagic looks for
	// certificates to renew.
	certValidity  time.Duration
	renewInterval time.Duration
}

// Timeouts of the handshake steps. Once a tunnel or request is under way
// there is no timeout: streams and WebSockets may run for hours.
const (
	handshakeTimeout  = 10 * time.Second // CONNECT reply, client TLS, certificate issuance
	credentialTimeout = 10 * time.Second // waiting for a credential
	dialTimeout       = 10 * time.Second // upstream TCP connect
	readHeaderTimeout = 30 * time.Second // a request's headers
	idleTimeout       = 2 * time.Minute  // a kept-alive connection between requests
)

// Proxy is the HTTP forward proxy. It is safe for concurrent use.
type Proxy struct {
	cfg           config.HTTP
	routes        *routeTable
	creds         proxy.Credentials
	audit         audit.Sink
	log           *zap.Logger
	metrics       *proxy.Metrics // nil-safe
	tunnelDefault bool
	workload      *proxy.WorkloadPolicy
	auditWL       *audit.Workload

	dial        dialFunc
	upstreamTLS *tls.Config     // every upstream TLS connection's (upstream.go)
	transport   *http.Transport // routed requests
	lean        *leanClient     // routed GETs and HEADs without a body (lean.go)
	limits      *limit.Listener
	// Passing through (default: tunnel): the dialer checks the deny list.
	deny          *denyList
	passDial      dialFunc
	passTransport *http.Transport
	certs         *certManager
	// tickets holds the session ticket keys of every tunnel's TLS server
	// (tunnelTLS): crypto/tls makes and rotates them. It serves no
	// connection itself.
	tickets *tls.Config
	gp      *goproxy.ProxyHttpServer

	// outer serves connections on the proxy listener; inner serves the
	// decrypted inside of intercepted tunnels.
	outer, inner     *http.Server
	outerLn, innerLn *connListener

	ctx    context.Context // every request's base; cancelled by Close
	cancel context.CancelFunc
	// draining ends when Shutdown or Close begins: tunnels still waiting
	// for their first request stop waiting, as idle connections do.
	draining context.Context
	drain    context.CancelFunc

	startOnce sync.Once
	servers   sync.WaitGroup // the two http.Server goroutines
	active    sync.WaitGroup // ServeConn calls

	mu        sync.Mutex
	closing   bool
	conns     map[*clientConn]struct{}
	closeOnce sync.Once
}

// New checks the config, loads the CA and the upstream roots and parses
// every template. It binds nothing and starts nothing but certmagic's
// maintenance goroutine, which Close stops.
func New(opts Options) (*Proxy, error) {
	cfg := opts.Config
	switch cfg.Default {
	case "":
		cfg.Default = config.DefaultHTTPDefault
	case "deny", "tunnel":
	default:
		return nil, fmt.Errorf("http.default: %q is not deny or tunnel", cfg.Default)
	}
	if opts.Credentials == nil {
		return nil, errors.New("httpproxy: Options.Credentials is required")
	}
	routes, err := newRouteTable(cfg.Routes)
	if err != nil {
		return nil, err
	}
	ca, err := LoadCA(cfg.CA.CertFile, cfg.CA.KeyFile)
	if err != nil {
		return nil, err
	}
	roots, err := upstreamRoots(cfg.UpstreamCAFile)
	if err != nil {
		return nil, err
	}

	p := &Proxy{
		cfg: cfg, routes: routes, creds: opts.Credentials, audit: opts.Audit, log: opts.Logger, metrics: opts.Metrics,
		tunnelDefault: cfg.Default == "tunnel",
		workload:      opts.Workload,
		auditWL:       opts.Workload.AuditWorkload(),
		dial:          opts.DialContext,
		limits:        opts.Limits,
		outerLn:       newConnListener(), innerLn: newConnListener(),
		conns: make(map[*clientConn]struct{}),
	}
	if p.audit == nil {
		p.audit = audit.Discard{}
	}
	if p.log == nil {
		p.log = zap.NewNop()
	}
	if p.dial == nil {
		d := &net.Dialer{KeepAlive: 30 * time.Second}
		p.dial = d.DialContext
	}
	if p.limits == nil {
		p.limits = &limit.Listener{}
	}
	deny := cfg.TunnelDeny
	if deny == nil {
		deny = config.DefaultTunnelDeny
	}
	if p.deny, err = newDenyList(deny, opts.OwnAddrs); err != nil {
		return nil, err
	}
	p.passDial = p.passDialer(opts.DialContext)
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.draining, p.drain = context.WithCancel(context.Background())

	p.upstreamTLS = upstreamTLSConfig(roots)
	p.tickets = &tls.Config{}
	p.transport = p.newTransport(p.dialUpstream)
	p.lean = newLeanClient(p.dialUpstream, dialTLS(p.dialUpstream, p.upstreamTLS))
	for _, r := range routes.routes {
		p.boundRoute(r)
	}
	p.passTransport = p.newTransport(func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, dialTimeout)
		defer cancel()
		return p.passDial(ctx, network, addr)
	})
	p.certs = newCertManager(ca, routes.routed, certOptions{validity: opts.certValidity, renewInterval: opts.renewInterval},
		p.log.Named("certs"))

	gp := goproxy.NewProxyHttpServer()
	gp.Tr = p.transport // goproxy's default skips TLS verification; never used, but never that
	gp.ConnectDial = nil
	gp.ConnectDialWithReq = nil
	gp.Verbose = false
	gp.Logger = goproxyLogger{p.log.Named("goproxy")}
	gp.KeepHeader = true // credproxy does all header hygiene, after reading Connection
	gp.KeepAcceptEncoding = true
	gp.NonproxyHandler = http.HandlerFunc(p.nonProxy)
	gp.OnRequest().HandleConnectFunc(p.onConnect)
	gp.OnRequest().DoFunc(p.onRequest)
	p.gp = gp

	p.outer = p.newServer(http.HandlerFunc(p.serveOuter), "outer")
	p.inner = p.newServer(http.HandlerFunc(p.serveInner), "inner")
	return p, nil
}

// newTransport is an upstream transport whose connections dial opens:
// plain ones for upstream: http, and for HTTPS the TLS handshake on top
// (dialTLS). Every transport is made here, so none can end up with
// another's dialer.
func (p *Proxy) newTransport(dial dialFunc) *http.Transport {
	return &http.Transport{
		Proxy:          nil, // never the environment's proxy: that may be credproxy itself
		DialContext:    dial,
		DialTLSContext: dialTLS(dial, p.upstreamTLS),
		// Unused while DialTLSContext is set; the same settings if not.
		TLSClientConfig:        p.upstreamTLS,
		TLSHandshakeTimeout:    handshakeTimeout,
		MaxIdleConns:           1024,
		MaxIdleConnsPerHost:    256,
		IdleConnTimeout:        90 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 1 << 20,
		// The app's Accept-Encoding goes upstream as sent and the response
		// comes back as the upstream encoded it.
		DisableCompression: true,
	}
}

func (p *Proxy) newServer(h http.Handler, name string) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       p.idleTimeout(),
		MaxHeaderBytes:    1 << 20,
		// "OPTIONS *" reaches credproxy's handler, to be refused and
		// audited, instead of net/http answering it.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     stdLog(p.log.Named(name)),
		BaseContext:                  func(net.Listener) context.Context { return p.ctx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if f, ok := c.(finisher); ok && st == http.StateClosed {
				f.markFinished()
			}
		},
		// HTTP/1.1 only, on both sides: no h2, no h2c.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
}

// upstreamRoots is the system pool plus http.upstream_ca_file.
func upstreamRoots(file string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if file == "" {
		return pool, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read http.upstream_ca_file: %w", err)
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("http.upstream_ca_file %s: no PEM certificate", file)
	}
	return pool, nil
}

// dialUpstream dials a routed upstream within dialTimeout.
func (p *Proxy) dialUpstream(ctx context.Context, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	return typedDial(p.dial)(ctx, network, addr)
}

// start runs the two HTTP servers, once.
func (p *Proxy) start() {
	p.startOnce.Do(func() {
		for _, s := range []struct {
			srv *http.Server
			ln  net.Listener
		}{{p.outer, p.outerLn}, {p.inner, p.innerLn}} {
			p.servers.Add(1)
			go func() {
				defer p.servers.Done()
				if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
					p.log.Error("http server stopped", zap.Error(err))
				}
			}()
		}
	})
}

// ErrClosed is returned by ServeConn once the proxy is shutting down.
var ErrClosed = errors.New("httpproxy: proxy closed")

// ServeConn serves one accepted connection until it ends and closes it; it
// blocks until then. sessionID names the connection in logs and the audit
// log (each tunnel is one session). Cancelling ctx closes the connection at
// once; Shutdown lets it finish first.
func (p *Proxy) ServeConn(ctx context.Context, conn net.Conn, sessionID string) error {
	if !p.limits.Conns.TryAcquire(p.cfg.MaxConnections) {
		return p.refuseConn(conn, sessionID)
	}
	defer p.limits.Conns.Release()
	if err := p.workload.Admit(conn); err != nil {
		return p.refuseWorkload(conn, sessionID, err)
	}
	c := newClientConn(conn, sessionID)
	c.workload = p.auditWL
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		conn.Close()
		return ErrClosed
	}
	p.conns[c] = struct{}{}
	p.active.Add(1)
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
		p.active.Done()
	}()
	p.start()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if err := p.outerLn.hand(ctx, c); err != nil {
		c.Close()
		return ErrClosed
	}
	<-c.finished
	return nil
}

// Shutdown stops accepting (ServeConn refuses new connections), lets
// requests in flight and open tunnels finish, and returns once they
// have. Idle kept-alive connections are closed at once. When ctx ends
// first, Close ends everything still open and Shutdown returns ctx's
// error. It is safe to call more than once, and with Close.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.stopAccepting()
	var wg sync.WaitGroup
	for _, s := range []*http.Server{p.outer, p.inner} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.Shutdown(ctx) // closes idle connections, waits for busy ones
		}()
	}
	drained := make(chan struct{})
	go func() {
		wg.Wait()
		p.active.Wait()
		close(drained)
	}()
	select {
	case <-drained:
		return p.Close()
	case <-ctx.Done():
		p.log.Warn("shutdown grace over; closing open connections")
		err := p.Close()
		<-drained
		if err != nil {
			return err
		}
		return ctx.Err()
	}
}

// Close closes every connection now, cancels requests in flight, waits
// for every goroutine the proxy started (connections, tunnels, the HTTP
// servers, certmagic's maintenance) and for every ServeConn to return,
// and drops idle upstream connections. It is idempotent.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.stopAccepting()
		p.cancel()
		_ = p.outer.Close()
		_ = p.inner.Close()
		p.mu.Lock()
		conns := make([]*clientConn, 0, len(p.conns))
		for c := range p.conns {
			conns = append(conns, c)
		}
		p.mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
		p.active.Wait()
		p.servers.Wait()
		p.transport.CloseIdleConnections()
		p.lean.close()
		p.passTransport.CloseIdleConnections()
		for _, r := range p.routes.routes {
			if r.transport != nil {
				r.transport.CloseIdleConnections()
			}
		}
		p.certs.stop()
	})
	return nil
}

// stopAccepting makes ServeConn refuse new connections.
func (p *Proxy) stopAccepting() {
	p.drain()
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	p.outerLn.Close()
}

// stdLog adapts zap for net/http's ErrorLog, at debug level: its messages
// are about clients misbehaving (TLS errors, bad requests).
func stdLog(l *zap.Logger) *log.Logger {
	sl, err := zap.NewStdLogAt(l, zapcore.DebugLevel)
	if err != nil {
		return zap.NewStdLog(l)
	}
	return sl
}

// goproxyLogger sends goproxy's messages to zap at debug level. goproxy
// only ever sees the app's request, never the injected one.
type goproxyLogger struct{ log *zap.Logger }

func (l goproxyLogger) Printf(format string, v ...any) {
	if ce := l.log.Check(zapcore.DebugLevel, "goproxy"); ce != nil {
		ce.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}
