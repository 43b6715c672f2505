package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// The HTTP tests run credproxy's forward proxy in-process with real clients
// (curl, Go net/http, Node, Python) in front of it and loopback TLS
// servers behind it. Hostnames such as allowed.com are never resolved: the
// clients hand them to the proxy (CONNECT allowed.com:443, or an absolute
// URL), and the proxy's dialer sends every host to the test server that
// plays it.

// httpHosts are the names the test upstreams answer for.
var httpHosts = []string{"allowed.com", "evil.com", "other.com", "allowed.com.evil.com", "api.allowed.com", "s3.allowed.com"}

// registerHTTPSecret adds a value and its base64, URL- and path-encoded
// forms to the no-leak collector.
func registerHTTPSecret(label, v string) {
	leaks.addSecret(label, v)
	leaks.addSecret(label+" (base64)", base64.StdEncoding.EncodeToString([]byte(v)))
	leaks.addSecret(label+" (base64url)", base64.RawURLEncoding.EncodeToString([]byte(v)))
	if e := url.QueryEscape(v); e != v {
		leaks.addSecret(label+" (URL-encoded)", e)
	}
	if e := url.PathEscape(v); e != v {
		leaks.addSecret(label+" (path-encoded)", e)
	}
}

// httpCreds makes fresh random secrets for one test: a token, a basic
// pair, an API key for the query injector and an AWS key pair.
type httpCreds struct {
	token, user, password, apiKey, accessKey, secretKey string
}

func newHTTPCreds(t *testing.T) httpCreds {
	c := httpCreds{
		token:     "ghp_" + httpRandHex(t, 16),
		user:      "svc-" + httpRandHex(t, 3),
		password:  "pw+/" + httpRandHex(t, 12) + "=&?",
		apiKey:    "key " + httpRandHex(t, 12) + "&x=1",
		accessKey: "AKIA" + strings.ToUpper(httpRandHex(t, 8)),
		secretKey: "sk/" + httpRandHex(t, 16) + "+Z",
	}
	for label, v := range map[string]string{"token": c.token, "basic password": c.password, "api key": c.apiKey, "aws secret key": c.secretKey} {
		registerHTTPSecret(fmt.Sprintf("%s of %s", label, t.Name()), v)
	}
	registerHTTPSecret("basic credentials of "+t.Name(), c.user+":"+c.password)
	return c
}

func httpRandHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func httpWriteFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// newStdDiscard is a log.Logger for test servers' own chatter.
func newStdDiscard() *log.Logger { return log.New(io.Discard, "", 0) }

func (c httpCreds) sources(t *testing.T) map[string]credentials.Source {
	t.Helper()
	out := map[string]credentials.Source{}
	for name, f := range map[string]map[string]string{
		"github": {"token": c.token},
		"basic":  {"username": c.user, "password": c.password},
		"apikey": {"key": c.apiKey},
		"aws":    {"access_key": c.accessKey, "secret_key": c.secretKey},
	} {
		s, err := credentials.NewStatic(f)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = s
	}
	return out
}

func httpHeaderRoute(host string) config.HTTPRoute {
	return config.HTTPRoute{Host: host, Credentials: "github", Upstream: "https",
		Inject: config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .token }}"}}}
}

// ---- upstream PKI and servers ----

// httpPKI is the CA of the test upstreams; the proxy trusts it through
// http.upstream_ca_file.
type httpPKI struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	file string
}

func newHTTPPKI(t *testing.T) *httpPKI {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "upstream test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := &httpPKI{cert: cert, key: key, file: filepath.Join(t.TempDir(), "upstream-ca.pem")}
	httpWriteFile(t, p.file, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	return p
}

func (p *httpPKI) serverCert(t *testing.T, names ...string) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: names[0]},
		DNSNames: names, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// httpSeen is one request an upstream received.
type httpSeen struct {
	Method, Host, Path, RawQuery, RequestURI string
	Header                                   http.Header
	Body                                     []byte
}

// httpUpstream is a TLS server on loopback playing httpHosts. It answers
// with the request's path and a digest of its Authorization, never the
// value, so that nothing a client prints can leak the credential.
type httpUpstream struct {
	t    *testing.T
	srv  *http.Server
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	reqs []httpSeen
	// handle, if set, answers instead of the default.
	handle func(w http.ResponseWriter, r *http.Request, body []byte)
}

func startHTTPUpstream(t *testing.T, cert *tls.Certificate) *httpUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &httpUpstream{t: t, ln: ln}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: newStdDiscard()}
	if cert != nil {
		u.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}}
		ln = tls.NewListener(ln, u.srv.TLSConfig)
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		_ = u.srv.Serve(ln)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = u.srv.Shutdown(ctx)
		u.wg.Wait()
	})
	return u
}

func (u *httpUpstream) addr() string { return u.ln.Addr().String() }

func (u *httpUpstream) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	u.mu.Lock()
	u.reqs = append(u.reqs, httpSeen{Method: r.Method, Host: r.Host, Path: r.URL.Path, RawQuery: r.URL.RawQuery,
		RequestURI: r.RequestURI, Header: r.Header.Clone(), Body: body})
	h := u.handle
	u.mu.Unlock()
	if h != nil {
		h(w, r, body)
		return
	}
	sum := sha256.Sum256([]byte(r.Header.Get("Authorization")))
	fmt.Fprintf(w, "ok %s %s auth-sha256=%s\n", r.Host, r.URL.Path, hex.EncodeToString(sum[:8]))
}

func (u *httpUpstream) requests() []httpSeen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]httpSeen(nil), u.reqs...)
}

func (u *httpUpstream) setHandler(h func(w http.ResponseWriter, r *http.Request, body []byte)) {
	u.mu.Lock()
	u.handle = h
	u.mu.Unlock()
}

// ---- the proxy ----

// httpHarness is an in-process HTTP proxy whose logs, audit records and
// client-visible output go to the no-leak collector.
type httpHarness struct {
	t         *testing.T
	p         *httpproxy.Proxy
	addr      string
	caFile    string // the interception CA
	bundle    string // interception CA + upstream CA, for clients of passed-through tunnels
	auditPath string
	logs      *lockedBuffer
	creds     httpCreds
	up        *httpUpstream
	pki       *httpPKI
	mu        sync.Mutex
	dials     []string
	dialTo    map[string]string // host -> address; default up
}

type httpSetup struct {
	routes []config.HTTPRoute
	def    string
	// upstream, when set, is the server every host is sent to; default a
	// TLS server for httpHosts signed by the trusted test CA.
	upstream *httpUpstream
}

func startHTTPProxy(t *testing.T, s httpSetup) *httpHarness {
	t.Helper()
	skipShort(t)
	dir := t.TempDir()
	if err := httpproxy.InitCA(dir, io.Discard); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	h := &httpHarness{t: t, caFile: filepath.Join(dir, httpproxy.CACertFile), auditPath: filepath.Join(dir, "audit.jsonl"),
		logs: leaks.stream(kindLog, t.Name()), creds: newHTTPCreds(t), pki: newHTTPPKI(t), dialTo: map[string]string{}}
	h.up = s.upstream
	if h.up == nil {
		cert := h.pki.serverCert(t, httpHosts...)
		h.up = startHTTPUpstream(t, &cert)
	}
	caPEM, _ := os.ReadFile(h.caFile)
	upPEM, _ := os.ReadFile(h.pki.file)
	h.bundle = filepath.Join(dir, "bundle.pem")
	httpWriteFile(t, h.bundle, string(caPEM)+string(upPEM))

	store := credentials.NewStore(h.creds.sources(t), credentials.Options{})
	aw, err := audit.Open(h.auditPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.HTTP{
		Listen:         "127.0.0.1:0",
		CA:             config.HTTPCA{CertFile: h.caFile, KeyFile: filepath.Join(dir, httpproxy.CAKeyFile)},
		UpstreamCAFile: h.pki.file,
		Default:        s.def,
		Routes:         s.routes,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	log := newLogger(h.logs)
	p, err := httpproxy.New(httpproxy.Options{Config: cfg, Credentials: store, Audit: aw, Logger: log,
		DialContext: h.dial, OwnAddrs: func() []net.Addr { return []net.Addr{ln.Addr()} }})
	if err != nil {
		ln.Close()
		t.Fatalf("httpproxy.New: %v", err)
	}
	h.p = p
	serveCtx, stopServing := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- proxy.Serve(serveCtx, ln, p, log) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ln.Close() // stop accepting, as the engine does before Shutdown
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("proxy Shutdown: %v", err)
		}
		stopServing()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		store.Close(ctx)
		aw.Close()
		data, err := os.ReadFile(h.auditPath)
		if err != nil {
			t.Errorf("read audit log: %v", err)
		}
		leaks.add(kindAudit, t.Name(), data)
		if t.Failed() {
			t.Logf("--- proxy log ---\n%s", tail(h.logs.Bytes(), 40))
		}
	})
	return h
}

// dial sends every upstream host to its test server, and records it.
func (h *httpHarness) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	h.mu.Lock()
	h.dials = append(h.dials, addr)
	to, ok := h.dialTo[host]
	h.mu.Unlock()
	if !ok {
		to = h.up.addr()
	}
	var d net.Dialer
	return d.DialContext(ctx, network, to)
}

// dialed lists the upstream addresses the proxy dialed.
func (h *httpHarness) dialed() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.dials...)
}

func (h *httpHarness) proxyURL() string { return "http://" + h.addr }

// auditRecords reads the audit log so far.
func (h *httpHarness) auditRecords() []audit.Record {
	h.t.Helper()
	data, err := os.ReadFile(h.auditPath)
	if err != nil {
		h.t.Fatalf("read audit log: %v", err)
	}
	var recs []audit.Record
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			h.t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

// waitAudit waits for a record matching match.
func (h *httpHarness) waitAudit(what string, match func(audit.Record) bool) audit.Record {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		recs := h.auditRecords()
		for _, r := range recs {
			if match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no audit record: %s; have:\n%s", what, auditDump(recs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// certsIssuedFor reports whether the proxy logged minting a certificate
// for host.
func (h *httpHarness) certsIssuedFor(host string) int {
	n := 0
	for line := range strings.SplitSeq(string(h.logs.Bytes()), "\n") {
		if strings.Contains(line, `"interception certificate issued"`) && strings.Contains(line, `"host":"`+host+`"`) {
			n++
		}
	}
	return n
}

// wantAuthOnce checks the upstream saw exactly one Authorization, the
// injected one.
func wantAuthOnce(t *testing.T, s httpSeen, want string) {
	t.Helper()
	if got := s.Header.Values("Authorization"); len(got) != 1 || got[0] != want {
		t.Errorf("upstream %s%s saw %d Authorization values; want exactly the injected one", s.Host, s.Path, len(got))
	}
}

// ---- clients ----

// httpGoClient is a Go net/http client using the proxy (http.ProxyURL:
// ProxyFromEnvironment caches the environment once per process) and
// trusting the interception CA, plus extra roots.
func (h *httpHarness) goClient(followRedirects bool, extra ...*x509.Certificate) *http.Client {
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(h.caFile)
	pool.AppendCertsFromPEM(caPEM)
	for _, c := range extra {
		pool.AddCert(c)
	}
	pu, _ := url.Parse(h.proxyURL())
	tr := &http.Transport{Proxy: http.ProxyURL(pu), TLSClientConfig: &tls.Config{RootCAs: pool}}
	h.t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	if !followRedirects {
		c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	}
	return c
}

// goDo runs one request and returns status and body; bodies and errors go
// to the no-leak collector.
func (h *httpHarness) goDo(c *http.Client, req *http.Request) (int, string, error) {
	resp, err := c.Do(req)
	if err != nil {
		leaks.add(kindClient, h.t.Name(), []byte(err.Error()))
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	leaks.add(kindClient, h.t.Name(), b)
	return resp.StatusCode, string(b), nil
}

// clientEnv is the environment of a client program: the proxy in the
// variables every tool reads, nothing inherited that would bypass it.
func (h *httpHarness) clientEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
			"REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE", "NODE_OPTIONS":
			continue
		}
		env = append(env, kv)
	}
	pu := h.proxyURL()
	env = append(env, "http_proxy="+pu, "https_proxy="+pu, "HTTPS_PROXY="+pu, "HTTP_PROXY="+pu, "NO_PROXY=", "no_proxy=")
	return append(env, extra...)
}

// run runs a client program; its combined output goes to the collector.
func (h *httpHarness) run(env []string, name string, args ...string) (stdout string, all string, err error) {
	h.t.Helper()
	path, lerr := exec.LookPath(name)
	if lerr != nil {
		h.t.Fatalf("%s is needed for this test and is not in PATH: %v", name, lerr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = env
	var outBuf, allBuf lockedBuffer
	cmd.Stdout = io.MultiWriter(&outBuf, &allBuf)
	cmd.Stderr = &allBuf
	err = cmd.Run()
	leaks.add(kindOutput, h.t.Name()+": "+name, allBuf.Bytes())
	return string(outBuf.Bytes()), string(allBuf.Bytes()), err
}

// curl runs curl through the proxy (from the environment) trusting caFile;
// it prints the body then a last line with the status code.
//
// status is the response's code; for a CONNECT the proxy refused, where
// there is none (curl says 000), it is the CONNECT's code. Tests read
// codes from here, not from curl's messages: stdout and stderr arrive
// interleaved in all, and may split a message ("response 40", "\n000", "3").
func (h *httpHarness) curl(caFile string, args ...string) (status string, body string, all string, err error) {
	h.t.Helper()
	base := []string{"-sS", "--max-time", "15", "--cacert", caFile, "-w", "\n%{http_code} %{http_connect}"}
	out, all, err := h.run(h.clientEnv(), "curl", append(base, args...)...)
	out = strings.TrimRight(out, "\n")
	last := out
	if i := strings.LastIndexByte(out, '\n'); i >= 0 {
		last, body = out[i+1:], out[:i]
	}
	status, connect, _ := strings.Cut(last, " ")
	if status == "000" && connect != "000" && connect != "" {
		status = connect
	}
	return status, body, all, err
}

// rawConnect opens a CONNECT tunnel by hand and returns the connection
// and the proxy's status.
func (h *httpHarness) rawConnect(target string) (net.Conn, *bufio.Reader, int) {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		h.t.Fatalf("CONNECT %s: %v", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		leaks.add(kindClient, h.t.Name(), b)
	}
	return c, br, resp.StatusCode
}

// tlsInTunnel does TLS inside an open tunnel.
func (h *httpHarness) tlsInTunnel(c net.Conn, serverName string, insecure bool) (*tls.Conn, error) {
	tc := tls.Client(c, &tls.Config{ServerName: serverName, RootCAs: h.caPool(), InsecureSkipVerify: insecure})
	return tc, tc.Handshake()
}

// inTLSTunnel opens a CONNECT tunnel to target, does TLS for serverName
// inside it (verifying the interception certificate), writes raw and
// reads one response.
func (h *httpHarness) inTLSTunnel(target, serverName, raw string) (*http.Response, string) {
	h.t.Helper()
	c, _, status := h.rawConnect(target)
	if status != http.StatusOK {
		h.t.Fatalf("CONNECT %s: %d", target, status)
	}
	tc, err := h.tlsInTunnel(c, serverName, false)
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := io.WriteString(tc, raw); err != nil {
		h.t.Fatalf("write in the tunnel: %v", err)
	}
	return h.readResponse(bufio.NewReader(tc))
}

// caPool trusts the interception CA.
func (h *httpHarness) caPool() *x509.CertPool {
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(h.caFile)
	pool.AppendCertsFromPEM(caPEM)
	return pool
}

// poolOf trusts an upstream test CA.
func poolOf(p *httpPKI) *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.cert)
	return pool
}

// readResponse reads one response; its body goes to the collector.
func (h *httpHarness) readResponse(br *bufio.Reader) (*http.Response, string) {
	h.t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		h.t.Fatalf("read response: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	leaks.add(kindClient, h.t.Name(), b)
	return resp, string(b)
}
