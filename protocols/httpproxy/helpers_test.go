package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Every goroutine has an owner: none may outlive the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The injected secrets. None may reach a client error, a log line or an
// audit record: every proxy started by startProxy checks at cleanup.
const (
	testToken     = "tok-9f8e7d6c5b4a3210"
	testUser      = "svc-user"
	testPassword  = "pw-Zq81#x/y+z=="
	testAccessKey = "AKIDEXAMPLE1234567"
	testSecretKey = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
	testAPIKey    = "key with spaces&=?/+"
)

const ioTimeout = 10 * time.Second

// secretForms are the values and encodings that must never leak.
func secretForms() []string {
	var out []string
	for _, v := range []string{testToken, testPassword, testSecretKey, testAPIKey} {
		out = append(out, v, base64.StdEncoding.EncodeToString([]byte(v)), url.QueryEscape(v), url.PathEscape(v))
	}
	out = append(out, base64.StdEncoding.EncodeToString([]byte(testUser+":"+testPassword)))
	return out
}

// ---- PKI for upstream servers ----

// testPKI is a CA for test upstreams (the proxy trusts it through
// upstream_ca_file) and can mint server certificates.
type testPKI struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
	file    string
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: bigSerial(t), Subject: pkix.Name{CommonName: "test upstream CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := &testPKI{cert: cert, key: key, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	p.file = filepath.Join(t.TempDir(), "upstream-ca.pem")
	if err := os.WriteFile(p.file, p.certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func bigSerial(t testing.TB) *big.Int {
	t.Helper()
	n, err := randomSerial()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// serverCert is a certificate for names (DNS names or IPs).
func (p *testPKI) serverCert(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: bigSerial(t), Subject: pkix.Name{CommonName: names[0]},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// ---- upstreams ----

// seen is one request an upstream received.
type seen struct {
	Method, Host, Path, RawQuery string
	RequestURI                   string // the request-target as it came on the wire
	Header                       http.Header
	Body                         []byte
	TLS                          bool
}

// upstream is an httptest server on loopback that records requests.
type upstream struct {
	srv     *httptest.Server
	mu      sync.Mutex
	reqs    []seen
	handler http.HandlerFunc // optional; default answers 200 "ok"
}

// startUpstream starts a TLS upstream with a certificate for names, or a
// cleartext one when pki is nil.
func startUpstream(t *testing.T, pki *testPKI, names ...string) *upstream {
	t.Helper()
	u := &upstream{}
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(u.serve))
	u.srv.Config.ErrorLog = zap.NewStdLog(zap.NewNop())
	if pki != nil {
		u.srv.TLS = &tls.Config{Certificates: []tls.Certificate{pki.serverCert(t, names...)}}
		u.srv.StartTLS()
	} else {
		u.srv.Start()
	}
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	u.mu.Lock()
	u.reqs = append(u.reqs, seen{Method: r.Method, Host: r.Host, Path: r.URL.Path, RawQuery: r.URL.RawQuery,
		RequestURI: r.RequestURI, Header: r.Header.Clone(), Body: body, TLS: r.TLS != nil})
	h := u.handler
	u.mu.Unlock()
	if h != nil {
		r.Body = io.NopCloser(bytes.NewReader(body))
		h(w, r)
		return
	}
	_, _ = io.WriteString(w, "ok")
}

func (u *upstream) requests() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seen(nil), u.reqs...)
}

func (u *upstream) setHandler(h http.HandlerFunc) {
	u.mu.Lock()
	u.handler = h
	u.mu.Unlock()
}

func (u *upstream) addr() string { return u.srv.Listener.Addr().String() }

// ---- the proxy under test ----

// memAudit collects audit records.
type memAudit struct {
	mu   sync.Mutex
	recs []audit.Record
}

func (a *memAudit) Record(r *audit.Record) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.recs = append(a.recs, *r)
}

func (a *memAudit) records() []audit.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]audit.Record(nil), a.recs...)
}

// find waits up to ioTimeout for a record matching match.
func (a *memAudit) find(t *testing.T, what string, match func(audit.Record) bool) audit.Record {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		for _, r := range a.records() {
			if match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no audit record: %s; have %+v", what, a.records())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// lockedBuffer is a bytes.Buffer safe for concurrent writers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Sync() error { return nil }

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testProxy is a running Proxy on a loopback listener.
type testProxy struct {
	p       *Proxy
	addr    string
	caPool  *x509.CertPool // trusts the interception CA
	caPEM   []byte
	audit   *memAudit
	logs    *lockedBuffer
	bodies  *lockedBuffer // what clients were told, for the no-leak check
	dialed  *dialLog
	cfg     config.HTTP
	serveWG sync.WaitGroup
}

// dialLog maps every upstream host:port to a test server and records
// what was dialed.
type dialLog struct {
	mu     sync.Mutex
	routes map[string]string // host:port (or host) -> address
	def    string
	dials  []string
	// fake answers a dial to a host (or host:port) in its stead.
	fake map[string]func() (net.Conn, error)
}

func (d *dialLog) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dials = append(d.dials, addr)
	host, _, _ := net.SplitHostPort(addr)
	if f := d.fake[addr]; f != nil || d.fake[host] != nil {
		if f == nil {
			f = d.fake[host]
		}
		d.mu.Unlock()
		return f()
	}
	to, ok := d.routes[addr]
	if !ok {
		to, ok = d.routes[host]
	}
	if !ok {
		to = d.def
	}
	d.mu.Unlock()
	if to == "" {
		to = "127.0.0.1:1" // nothing listens: a real "connection refused"
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, to)
}

func (d *dialLog) all() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.dials...)
}

// proxySetup describes a test proxy.
type proxySetup struct {
	routes []config.HTTPRoute
	def    string // http.default
	upCA   *testPKI
	dial   map[string]string
	// fakeDial answers the dials to a host (or host:port) in dial's stead.
	fakeDial map[string]func() (net.Conn, error)
	fields   map[string]map[string]string // credential name -> fields
	creds    proxy.Credentials            // overrides fields
	validity time.Duration
	renew    time.Duration
	// realDial uses the proxy's own dialer instead of the dial map.
	realDial bool
	// tune adjusts the config before the proxy is built.
	tune    func(*config.HTTP)
	metrics *proxy.Metrics
	// own lists the process's other listeners; the proxy's own is added.
	own func() []net.Addr
}

func headerRoute(host string) config.HTTPRoute {
	return config.HTTPRoute{Host: host, Credentials: "tok", Upstream: "https",
		Inject: config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .token }}"}}}
}

func defaultFields() map[string]map[string]string {
	return map[string]map[string]string{
		"tok":   {"token": testToken},
		"basic": {"username": testUser, "password": testPassword},
		"aws":   {"access_key": testAccessKey, "secret_key": testSecretKey},
		"api":   {"key": testAPIKey},
	}
}

func startProxy(t testing.TB, s proxySetup) *testProxy {
	t.Helper()
	dir := t.TempDir()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	cfg := config.HTTP{
		Listen:  "127.0.0.1:0",
		CA:      config.HTTPCA{CertFile: filepath.Join(dir, CACertFile), KeyFile: filepath.Join(dir, CAKeyFile)},
		Default: s.def,
		Routes:  s.routes,
	}
	if s.upCA != nil {
		cfg.UpstreamCAFile = s.upCA.file
	}
	if s.tune != nil {
		s.tune(&cfg)
	}
	creds := s.creds
	if creds == nil {
		fields := s.fields
		if fields == nil {
			fields = defaultFields()
		}
		sources := map[string]credentials.Source{}
		for name, f := range fields {
			st, err := credentials.NewStatic(f)
			if err != nil {
				t.Fatal(err)
			}
			sources[name] = st
		}
		store := credentials.NewStore(sources, credentials.Options{})
		t.Cleanup(func() { store.Close(context.Background()) })
		creds = store
	}
	tp := &testProxy{audit: &memAudit{}, logs: &lockedBuffer{}, bodies: &lockedBuffer{},
		dialed: &dialLog{routes: s.dial, fake: s.fakeDial}, cfg: cfg}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), tp.logs, zapcore.DebugLevel))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tp.addr = ln.Addr().String()
	own := func() []net.Addr {
		addrs := []net.Addr{ln.Addr()}
		if s.own != nil {
			addrs = append(addrs, s.own()...)
		}
		return addrs
	}
	o := Options{Config: cfg, Credentials: creds, Audit: tp.audit, Logger: log, Metrics: s.metrics,
		DialContext: tp.dialed.dial, certValidity: s.validity, renewInterval: s.renew, OwnAddrs: own}
	if s.realDial {
		o.DialContext = nil
	}
	p, err := New(o)
	if err != nil {
		ln.Close()
		t.Fatalf("New: %v", err)
	}
	tp.p = p
	tp.caPEM, _ = os.ReadFile(cfg.CA.CertFile)
	tp.caPool = x509.NewCertPool()
	tp.caPool.AppendCertsFromPEM(tp.caPEM)
	ctx, stop := context.WithCancel(context.Background())
	tp.serveWG.Add(1)
	go func() {
		defer tp.serveWG.Done()
		if err := proxy.Serve(ctx, ln, p, log); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		stop() // closes ln
		tp.serveWG.Wait()
		tp.checkNoLeaks(t)
	})
	return tp
}

// metricValue reads the series of metric name whose labels include
// labels from m's registry: a counter's or a gauge's value; 0 when there
// is no such series.
func metricValue(t testing.TB, m *proxy.Metrics, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, s := range f.GetMetric() {
			have := map[string]string{}
			for _, lp := range s.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue series
				}
			}
			if s.GetGauge() != nil {
				return s.GetGauge().GetValue()
			}
			return s.GetCounter().GetValue()
		}
	}
	return 0
}

// seriesCount is how many series metric name has in m.
func seriesCount(t testing.TB, m *proxy.Metrics, name string) int {
	t.Helper()
	n, err := testutil.GatherAndCount(m.Registry, name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// checkNoLeaks fails the test if a secret reached a log line, an audit
// record or a body credproxy sent.
func (tp *testProxy) checkNoLeaks(t testing.TB) {
	t.Helper()
	var auditBuf bytes.Buffer
	for _, r := range tp.audit.records() {
		fmt.Fprintf(&auditBuf, "%+v\n", r)
		if r.Error != nil {
			auditBuf.WriteString(*r.Error)
		}
	}
	for what, data := range map[string]string{"log": tp.logs.String(), "audit": auditBuf.String(), "client body": tp.bodies.String()} {
		for _, f := range secretForms() {
			if strings.Contains(data, f) {
				t.Errorf("a secret (or its encoding) appeared in the %s", what)
			}
		}
	}
}

func (tp *testProxy) proxyURL() *url.URL { return &url.URL{Scheme: "http", Host: tp.addr} }

// client is a Go HTTP client using the proxy and trusting its CA (and
// the CAs of extra, for tunnels passed through to an upstream). It does
// not follow redirects.
func (tp *testProxy) client(t *testing.T, extra ...*testPKI) *http.Client {
	t.Helper()
	pool := tp.caPool.Clone()
	for _, e := range extra {
		pool.AddCert(e.cert)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(tp.proxyURL()), TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: ioTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// get does a GET through the proxy and returns status and body (the body
// is recorded for the no-leak check).
func (tp *testProxy) do(t *testing.T, c *http.Client, req *http.Request) (int, string) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		tp.bodies.Write([]byte(err.Error()))
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	tp.bodies.Write(b)
	return resp.StatusCode, string(b)
}

func (tp *testProxy) get(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tp.do(t, c, req)
}

// connect opens a raw CONNECT tunnel and returns the connection after the
// proxy's answer, and the status.
func (tp *testProxy) connect(t *testing.T, target string) (net.Conn, *bufio.Reader, int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", tp.addr, ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	if resp.StatusCode != http.StatusOK { // a 2xx to CONNECT has no body: the tunnel follows
		b, _ := io.ReadAll(resp.Body)
		tp.bodies.Write(b)
	}
	return c, br, resp.StatusCode
}

// tlsTunnel CONNECTs to target and does TLS with serverName inside.
func (tp *testProxy) tlsTunnel(t *testing.T, target, serverName string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	c, br, status := tp.connect(t, target)
	if status != http.StatusOK {
		t.Fatalf("CONNECT %s: status %d", target, status)
	}
	if br.Buffered() > 0 {
		t.Fatalf("CONNECT %s: %d unexpected bytes after the reply", target, br.Buffered())
	}
	if cfg == nil {
		cfg = &tls.Config{RootCAs: tp.caPool}
	}
	cfg.ServerName = serverName
	tc := tls.Client(c, cfg)
	err := tc.Handshake()
	return tc, err
}

// rawRequest writes raw bytes on c and reads one response.
func (tp *testProxy) rawRequest(t *testing.T, c net.Conn, br *bufio.Reader, raw string) *http.Response {
	t.Helper()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body = io.NopCloser(bytes.NewReader(b))
	tp.bodies.Write(b)
	return resp
}

func body(r *http.Response) string {
	b, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(b))
	return string(b)
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// ---- a wire-level upstream ----

// wireSeen is one request head as it arrived on the wire, before any
// HTTP server could interpret (or reject) it.
type wireSeen struct {
	Line   string // the request line
	Header textproto.MIMEHeader
}

// wireUpstream reads request heads off the wire and answers each with
// 200 "ok". Unlike an httptest server it records what a net/http server
// would refuse to hand to a handler (a target that is not a URI, "PRI *").
type wireUpstream struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	reqs []wireSeen
}

// startWireUpstream listens on loopback: TLS with a certificate for names
// when pki is set, cleartext otherwise.
func startWireUpstream(t testing.TB, pki *testPKI, names ...string) *wireUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &wireUpstream{ln: ln}
	if pki != nil {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{pki.serverCert(t, names...)}})
	}
	var conns sync.Map
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				defer conns.Delete(c)
				u.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		u.ln.Close()
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		u.wg.Wait()
	})
	return u
}

func (u *wireUpstream) serve(c net.Conn) {
	defer c.Close()
	tr := textproto.NewReader(bufio.NewReaderSize(c, 64<<10))
	for {
		line, err := tr.ReadLine()
		if err != nil {
			return
		}
		h, err := tr.ReadMIMEHeader()
		if err != nil {
			return
		}
		u.mu.Lock()
		u.reqs = append(u.reqs, wireSeen{Line: line, Header: h})
		u.mu.Unlock()
		if h.Get("Content-Length") != "" || h.Get("Transfer-Encoding") != "" {
			// Bodies are not expected here; answer and end the connection.
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
			return
		}
		resp := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		if strings.HasPrefix(line, "HEAD ") {
			resp = strings.TrimSuffix(resp, "ok")
		}
		if _, err := io.WriteString(c, resp); err != nil {
			return
		}
	}
}

func (u *wireUpstream) addr() string { return u.ln.Addr().String() }

func (u *wireUpstream) requests() []wireSeen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]wireSeen(nil), u.reqs...)
}

// originFormViolation says what is wrong with a request head the proxy
// sent upstream, or returns "": the target must be origin-form, the
// method one credproxy forwards, and the Host exactly want, once.
func originFormViolation(s wireSeen, want string) string {
	method, rest, ok1 := strings.Cut(s.Line, " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" {
		return fmt.Sprintf("malformed request line %q", s.Line)
	}
	switch strings.ToUpper(method) {
	case "PRI", "TRACE", "TRACK", "CONNECT":
		return fmt.Sprintf("method %q forwarded", method)
	}
	if !strings.HasPrefix(target, "/") {
		return fmt.Sprintf("request-target %q is not origin-form", target)
	}
	if u, err := url.ParseRequestURI(target); err != nil || u.Scheme != "" || u.Host != "" || u.Opaque != "" || u.User != nil {
		return fmt.Sprintf("request-target %q does not parse as origin-form", target)
	}
	if strings.ContainsAny(target, "# \t") {
		return fmt.Sprintf("request-target %q has a fragment or whitespace", target)
	}
	if hs := s.Header.Values("Host"); len(hs) != 1 || hs[0] != want {
		return fmt.Sprintf("Host %q, want exactly %q", hs, want)
	}
	return ""
}
