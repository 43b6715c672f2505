package httpproxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// apiSetup: api.test routed with a header credential to a TLS upstream.
func apiSetup(t *testing.T) (*testProxy, *upstream, *testPKI) {
	t.Helper()
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test", "evil.test", "other.test")
	tp := startProxy(t, proxySetup{
		routes: []config.HTTPRoute{headerRoute("api.test")},
		upCA:   pki,
		dial:   map[string]string{"api.test": up.addr(), "evil.test": up.addr(), "other.test": up.addr()},
	})
	return tp, up, pki
}

func wantOneAuth(t *testing.T, s seen, want string) {
	t.Helper()
	if got := s.Header.Values("Authorization"); len(got) != 1 || got[0] != want {
		t.Errorf("upstream saw Authorization %d times (want exactly once, the injected value)", len(got))
	}
}

func TestHeaderInjection(t *testing.T) {
	tp, up, _ := apiSetup(t)
	c := tp.client(t)
	for _, tc := range []struct{ name, url string }{
		{"intercepted https", "https://api.test/v1/repos?page=2"},
		{"plain http upgraded to https", "http://api.test/v1/repos?page=2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.requests())
			req, _ := http.NewRequest(http.MethodGet, tc.url, nil)
			req.Header.Set("Authorization", "Bearer app-has-its-own")
			req.Header.Set("Proxy-Authorization", "Basic cHJveHk6cHJveHk=")
			req.Header.Set("X-App", "kept")
			status, b := tp.do(t, c, req)
			if status != http.StatusOK || b != "ok" {
				t.Fatalf("status %d body %q", status, b)
			}
			reqs := up.requests()
			if len(reqs) != before+1 {
				t.Fatalf("upstream saw %d requests, want 1", len(reqs)-before)
			}
			s := reqs[len(reqs)-1]
			wantOneAuth(t, s, "Bearer "+testToken)
			if !s.TLS || s.Host != "api.test" || s.Path != "/v1/repos" || s.RawQuery != "page=2" {
				t.Errorf("upstream saw tls=%v host=%q path=%q query=%q", s.TLS, s.Host, s.Path, s.RawQuery)
			}
			if s.Header.Get("X-App") != "kept" || s.Header.Get("Proxy-Authorization") != "" {
				t.Errorf("headers: X-App=%q Proxy-Authorization present=%v", s.Header.Get("X-App"), s.Header.Get("Proxy-Authorization") != "")
			}
		})
	}
	rec := tp.audit.find(t, "request record", func(r audit.Record) bool { return r.Event == audit.EventRequest && r.Status == 200 })
	if rec.Protocol != "http" || rec.Service != "api.test" || rec.Host != "api.test" || rec.Path != "/v1/repos" ||
		rec.Injected == nil || !*rec.Injected || rec.Method != "GET" || rec.BytesOut == nil || *rec.BytesOut != 2 || rec.DurationMS == nil {
		t.Errorf("request record %+v", rec)
	}
	tp.audit.find(t, "session_start", func(r audit.Record) bool {
		return r.Event == audit.EventSessionStart && r.Upstream == "api.test:443" && r.Credential == "tok"
	})
}

func TestUnroutedDenied(t *testing.T) {
	tp, up, _ := apiSetup(t)
	t.Run("plain", func(t *testing.T) {
		status, b := tp.get(t, tp.client(t), "http://evil.test/x")
		if status != http.StatusForbidden || !strings.Contains(b, "no route for evil.test:80") {
			t.Errorf("status %d body %q", status, b)
		}
	})
	t.Run("connect", func(t *testing.T) {
		_, br, status := tp.connect(t, "evil.test:443")
		if status != http.StatusForbidden {
			t.Errorf("CONNECT status %d", status)
		}
		if _, err := br.Peek(1); err == nil {
			t.Error("the connection stayed open after the refusal")
		}
	})
	t.Run("https client", func(t *testing.T) {
		_, err := tp.client(t).Get("https://evil.test/")
		if err == nil || !strings.Contains(err.Error(), "Forbidden") {
			t.Errorf("err = %v", err)
		}
	})
	if n := tp.p.certs.issued(); n != 0 {
		t.Errorf("%d certificates minted for an unrouted host", n)
	}
	if n := len(up.requests()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
	if d := tp.dialed.all(); len(d) != 0 {
		t.Errorf("dialed %v", d)
	}
	rec := tp.audit.find(t, "denied", func(r audit.Record) bool { return r.Event == audit.EventDenied && r.Method == "CONNECT" })
	if rec.Reason != "no route" || rec.Service != "evil.test" || rec.Status != 403 {
		t.Errorf("denied record %+v", rec)
	}
}

func TestDefaultTunnelPassesThrough(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test", "other.test")
	tp := startProxy(t, proxySetup{def: "tunnel", routes: []config.HTTPRoute{headerRoute("api.test")}, upCA: pki,
		dial: map[string]string{"api.test": up.addr(), "other.test": up.addr()}})
	c := tp.client(t, pki) // the app verifies other.test's own certificate
	status, _ := tp.get(t, c, "https://other.test/free")
	if status != 200 {
		t.Fatalf("status %d", status)
	}
	s := up.requests()[0]
	if len(s.Header.Values("Authorization")) != 0 {
		t.Error("a passed-through tunnel got a credential")
	}
	if tp.p.certs.issued() != 0 {
		t.Error("a certificate was minted for a passed-through tunnel")
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	tp.audit.find(t, "session_end", func(r audit.Record) bool {
		return r.Event == audit.EventSessionEnd && r.Service == "other.test" && r.BytesIn != nil && *r.BytesIn > 0
	})
}

func TestHostMatchingOnConnect(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test", "a.wild.test", "a.b.wild.test")
	tp := startProxy(t, proxySetup{
		routes: []config.HTTPRoute{headerRoute("api.test"), headerRoute("*.wild.test")},
		upCA:   pki, dial: map[string]string{"": ""},
	})
	tp.dialed.def = up.addr()
	for _, tc := range []struct {
		target string
		ok     bool
	}{
		{"api.test:443", true},
		{"API.TEST:443", true},
		{"api.test.:443", true},
		{"api.test:0443", true},
		{"api.test", true}, // port defaults to 443
		{"api.test:8443", false},
		{"api.test.evil.test:443", false},
		{"evilapi.test:443", false},
		{"xapi.test:443", false},
		{"a.wild.test:443", true},
		{"a.b.wild.test:443", true},
		{"wild.test:443", false},
		{"wild.test.evil.test:443", false},
		{"a.wild.test.evil:443", false},
		{"api.test%00.evil:443", false},
		{"api..test:443", false},
	} {
		t.Run(tc.target, func(t *testing.T) {
			_, _, status := tp.connect(t, tc.target)
			if got := status == http.StatusOK; got != tc.ok {
				t.Errorf("CONNECT %s: status %d, want routed=%v", tc.target, status, tc.ok)
			}
		})
	}
}

// The injected request goes to the CONNECT host whatever the inner
// request says; a mismatch is refused and the tunnel closed.
func TestTunnelHostBinding(t *testing.T) {
	tp, up, _ := apiSetup(t)
	for _, tc := range []struct{ name, raw string }{
		{"other Host", "GET /x HTTP/1.1\r\nHost: evil.test\r\n\r\n"},
		{"other port", "GET /x HTTP/1.1\r\nHost: api.test:8443\r\n\r\n"},
		{"absolute form, other host", "GET https://evil.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"},
		{"absolute form, other scheme", "GET http://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"},
		{"lookalike", "GET /x HTTP/1.1\r\nHost: api.test.evil.test\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc2, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tc2.Close()
			resp := tp.rawRequest(t, tc2, bufio.NewReader(tc2), tc.raw)
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(body(resp), "inside a tunnel to api.test:443") {
				t.Errorf("status %d body %q", resp.StatusCode, body(resp))
			}
			if !resp.Close {
				t.Error("the tunnel stays open after a host mismatch")
			}
		})
	}
	t.Run("equivalent spellings pass", func(t *testing.T) {
		tc2, err := tp.tlsTunnel(t, "API.test.:443", "api.test", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tc2.Close()
		br := bufio.NewReader(tc2)
		for _, h := range []string{"api.test", "API.TEST", "api.test.", "api.test:443"} {
			resp := tp.rawRequest(t, tc2, br, "GET /ok HTTP/1.1\r\nHost: "+h+"\r\n\r\n")
			if resp.StatusCode != 200 {
				t.Errorf("Host %s: status %d", h, resp.StatusCode)
			}
		}
	})
	for _, s := range up.requests() {
		if s.Path != "/ok" || s.Host != "api.test" {
			t.Errorf("upstream saw %s%s", s.Host, s.Path)
		}
	}
}

func TestPipelinedRequestForAnotherHost(t *testing.T) {
	tp, up, _ := apiSetup(t)
	tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	// Both requests in one write.
	if _, err := io.WriteString(tc, "GET /first HTTP/1.1\r\nHost: api.test\r\n\r\nGET /second HTTP/1.1\r\nHost: evil.test\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(tc)
	r1, err := http.ReadResponse(br, nil)
	if err != nil || r1.StatusCode != 200 {
		t.Fatalf("first: %v %v", r1, err)
	}
	io.Copy(io.Discard, r1.Body)
	r2, err := http.ReadResponse(br, nil)
	if err != nil || r2.StatusCode != http.StatusForbidden {
		t.Fatalf("second: %v %v", r2, err)
	}
	tp.bodies.Write([]byte(body(r2)))
	if reqs := up.requests(); len(reqs) != 1 || reqs[0].Path != "/first" {
		t.Errorf("upstream saw %+v", reqs)
	}
}

func TestSNIMismatch(t *testing.T) {
	tp, up, _ := apiSetup(t)
	// A verifying client cannot even complete the handshake: the
	// certificate is for the CONNECT host.
	if _, err := tp.tlsTunnel(t, "api.test:443", "evil.test", nil); err == nil {
		t.Fatal("handshake with SNI evil.test succeeded against a certificate for api.test")
	}
	// One that does not verify gets a 403 for every request.
	tc, err := tp.tlsTunnel(t, "api.test:443", "evil.test", &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if cn := tc.ConnectionState().PeerCertificates[0].DNSNames; len(cn) != 1 || cn[0] != "api.test" {
		t.Errorf("served a certificate for %v", cn)
	}
	resp := tp.rawRequest(t, tc, bufio.NewReader(tc), "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body(resp), `TLS server name "evil.test"`) {
		t.Errorf("status %d body %q", resp.StatusCode, body(resp))
	}
	if len(up.requests()) != 0 {
		t.Error("upstream got a request")
	}
	if n := tp.p.certs.issued(); n != 1 {
		t.Errorf("%d certificates issued, want 1 (api.test only)", n)
	}
}

func TestRedirectIsReturnedNotFollowed(t *testing.T) {
	tp, up, pki := apiSetup(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Host == "api.test" {
			http.Redirect(w, r, "https://other.test/landing", http.StatusFound)
			return
		}
		io.WriteString(w, "landed")
	})
	c := tp.client(t, pki)
	c.CheckRedirect = nil // follow, as apps do
	_, err := c.Get("https://api.test/start")
	// other.test has no route: following the redirect is refused.
	if err == nil || !strings.Contains(err.Error(), "Forbidden") {
		t.Errorf("following the redirect: %v", err)
	}
	reqs := up.requests()
	if len(reqs) != 1 || reqs[0].Host != "api.test" {
		t.Fatalf("upstream saw %+v", reqs)
	}
	tp.audit.find(t, "302 returned", func(r audit.Record) bool { return r.Event == audit.EventRequest && r.Status == 302 })
}

func TestUntrustedUpstream(t *testing.T) {
	bad := httptest502(t)
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": bad.Listener.Addr().String()}})
	for _, u := range []string{"https://api.test/", "http://api.test/"} {
		status, b := tp.get(t, tp.client(t), u)
		if status != http.StatusBadGateway || !strings.Contains(b, "TLS verification failed") {
			t.Errorf("%s: status %d body %q", u, status, b)
		}
	}
	tp.audit.find(t, "denied upstream TLS", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "upstream TLS failed"
	})
}

// httptest502 is a TLS server with httptest's own certificate, which the
// proxy does not trust; its handler fails the test if reached.
func httptest502(t *testing.T) *httptest.Server {
	t.Helper()
	s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("untrusted upstream got a request: the credential went to it")
	}))
	s.Config.ErrorLog = zap.NewStdLog(zap.NewNop())
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

func TestConnectionHeaderCannotRemoveInjected(t *testing.T) {
	tp, up, _ := apiSetup(t)
	c := tp.client(t)
	for _, u := range []string{"https://api.test/c", "http://api.test/c"} {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Connection", "Authorization, X-Hop")
		req.Header.Set("X-Hop", "x")
		req.Header.Set("Authorization", "Bearer app")
		if status, _ := tp.do(t, c, req); status != 200 {
			t.Fatalf("%s: status %d", u, status)
		}
		s := up.requests()[len(up.requests())-1]
		wantOneAuth(t, s, "Bearer "+testToken)
		if s.Header.Get("X-Hop") != "" || s.Header.Get("Connection") != "" {
			t.Errorf("%s: hop-by-hop headers reached the upstream: %v", u, s.Header)
		}
	}
}

func TestHTTP2Refused(t *testing.T) {
	tp, up, _ := apiSetup(t)
	t.Run("ALPN h2 only", func(t *testing.T) {
		_, err := tp.tlsTunnel(t, "api.test:443", "api.test", &tls.Config{RootCAs: tp.caPool, NextProtos: []string{"h2"}})
		if err == nil {
			t.Fatal("an h2-only client completed the handshake")
		}
	})
	t.Run("ALPN h2 and http/1.1", func(t *testing.T) {
		tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", &tls.Config{RootCAs: tp.caPool, NextProtos: []string{"h2", "http/1.1"}})
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		if p := tc.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
			t.Errorf("negotiated %q", p)
		}
	})
	t.Run("Go client forcing h2", func(t *testing.T) {
		tr := &http.Transport{Proxy: http.ProxyURL(tp.proxyURL()), TLSClientConfig: &tls.Config{RootCAs: tp.caPool}, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: ioTimeout}).Get("https://api.test/h2")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 1 {
			t.Errorf("proto %s", resp.Proto)
		}
	})
	t.Run("h2c upgrade header dropped", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://api.test/up", nil)
		req.Header.Set("Connection", "Upgrade, HTTP2-Settings")
		req.Header.Set("Upgrade", "h2c")
		req.Header.Set("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")
		if status, _ := tp.do(t, tp.client(t), req); status != 200 {
			t.Fatalf("status %d", status)
		}
		s := up.requests()[len(up.requests())-1]
		if s.Header.Get("Upgrade") != "" || s.Header.Get("Http2-Settings") != "" {
			t.Errorf("h2c upgrade reached the upstream: %v", s.Header)
		}
	})
}

func TestH2CPriorKnowledgeInTunnelRefused(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "plain.test")
	r := headerRoute("plain.test:80")
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{r}, upCA: pki, dial: map[string]string{"plain.test": up.addr()}})
	c, br, status := tp.connect(t, "plain.test:80")
	if status != 200 {
		t.Fatalf("CONNECT status %d", status)
	}
	resp := tp.rawRequest(t, c, br, h2Preface)
	if resp.StatusCode != http.StatusHTTPVersionNotSupported {
		t.Errorf("status %d", resp.StatusCode)
	}
	// Cleartext HTTP/1.1 in the same kind of tunnel is served, upgraded to TLS upstream.
	c2, br2, _ := tp.connect(t, "plain.test:80")
	resp = tp.rawRequest(t, c2, br2, "GET /clear HTTP/1.1\r\nHost: plain.test\r\n\r\n")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d %q", resp.StatusCode, body(resp))
	}
	if s := up.requests(); len(s) != 1 || !s[0].TLS {
		t.Errorf("upstream saw %+v", s)
	}
}

func TestMaxConcurrent(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	r := headerRoute("api.test")
	r.MaxConcurrent = 1
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{r}, upCA: pki, dial: map[string]string{"api.test": up.addr()}})
	entered, release := make(chan struct{}), make(chan struct{})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		io.WriteString(w, "ok")
	})
	c := tp.client(t)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		resp, err := c.Get("https://api.test/slow")
		if err == nil {
			resp.Body.Close()
		}
	}()
	<-entered
	status, b := tp.get(t, tp.client(t), "https://api.test/fast")
	if status != http.StatusServiceUnavailable || !strings.Contains(b, "max_concurrent (1)") {
		t.Errorf("second request: status %d body %q", status, b)
	}
	close(release)
	wg.Wait()
	if status, _ := tp.get(t, c, "https://api.test/fast"); status != 200 {
		t.Errorf("after release: status %d", status)
	}
}

// failingCreds is a credential store that is down.
type failingCreds struct{}

func (failingCreds) Acquire(_ context.Context, name string) (*credentials.Handle, error) {
	return nil, &credentials.UnavailableError{Name: name, Err: fmt.Errorf("vault unreachable: dial tcp 10.0.0.1:8200: i/o timeout")}
}

func TestCredentialUnavailable(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{headerRoute("api.test")}, upCA: pki,
		dial: map[string]string{"api.test": up.addr()}, creds: failingCreds{}})
	status, b := tp.get(t, tp.client(t), "https://api.test/")
	if status != http.StatusServiceUnavailable || !strings.Contains(b, `credential "tok" unavailable: vault unreachable`) {
		t.Errorf("status %d body %q", status, b)
	}
	if len(up.requests()) != 0 {
		t.Error("request went upstream without a credential")
	}
}

func TestMissingFieldIs503(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{headerRoute("api.test")}, upCA: pki,
		dial: map[string]string{"api.test": up.addr()}, fields: map[string]map[string]string{"tok": {"other": testToken}}})
	status, b := tp.get(t, tp.client(t), "https://api.test/")
	if status != http.StatusServiceUnavailable || !strings.Contains(b, `map has no entry for key "token"`) {
		t.Errorf("status %d body %q", status, b)
	}
}

func TestUpstreamHTTPOptIn(t *testing.T) {
	up := startUpstream(t, nil)
	r := headerRoute("plain.test")
	r.Upstream = "http"
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{r}, dial: map[string]string{"plain.test:80": up.addr()}})
	if status, _ := tp.get(t, tp.client(t), "http://plain.test/x"); status != 200 {
		t.Fatalf("status %d", status)
	}
	s := up.requests()[0]
	if s.TLS {
		t.Error("TLS upstream for upstream: http")
	}
	wantOneAuth(t, s, "Bearer "+testToken)
}

func TestWebSocketGetsCredential(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "ws.test")
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testToken || !isWebSocket(r.Header) {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
		line, _ := brw.ReadString('\n')
		fmt.Fprintf(c, "echo:%s", line)
	})
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{headerRoute("ws.test")}, upCA: pki, dial: map[string]string{"ws.test": up.addr()}})
	tc, err := tp.tlsTunnel(t, "ws.test:443", "ws.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	br := bufio.NewReader(tc)
	io.WriteString(tc, "GET /socket HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(tc, "hello\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "echo:hello\n" {
		t.Fatalf("echo %q %v", line, err)
	}
}

func TestShutdownDrainsAndCloseEnds(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{headerRoute("api.test")}, upCA: pki, dial: map[string]string{"api.test": up.addr()}})
	entered, release := make(chan struct{}), make(chan struct{})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		io.WriteString(w, "done")
	})
	c := tp.client(t)
	got := make(chan int, 1)
	go func() {
		resp, err := c.Get("https://api.test/slow")
		if err != nil {
			got <- 0
			return
		}
		resp.Body.Close()
		got <- resp.StatusCode
	}()
	<-entered
	shut := make(chan error, 1)
	go func() { shut <- tp.p.Shutdown(context.Background()) }()
	time.Sleep(100 * time.Millisecond)
	// The listener is its server's to close; the proxy closes what it is
	// handed from now on, unserved.
	nc, err := net.DialTimeout("tcp", tp.addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(ioTimeout))
	if b, err := io.ReadAll(nc); err != nil || len(b) != 0 {
		t.Errorf("a connection after Shutdown got %q, %v; want it closed unserved", b, err)
	}
	nc.Close()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	default:
	}
	close(release)
	if s := <-got; s != 200 {
		t.Errorf("in-flight request got %d", s)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func TestShutdownGraceEndsTunnels(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test", "other.test")
	tp := startProxy(t, proxySetup{def: "tunnel", routes: []config.HTTPRoute{headerRoute("api.test")}, upCA: pki,
		dial: map[string]string{"other.test": up.addr()}})
	c, _, status := tp.connect(t, "other.test:443")
	if status != 200 {
		t.Fatal(status)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := tp.p.Shutdown(ctx); err != context.DeadlineExceeded {
		t.Errorf("Shutdown = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %s", d)
	}
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("tunnel still open after Shutdown's grace")
	}
	tp.audit.find(t, "session_end", func(r audit.Record) bool { return r.Event == audit.EventSessionEnd })
}

func TestUpstreamUnreachable(t *testing.T) {
	tp := startProxy(t, proxySetup{def: "tunnel", routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{}})
	status, b := tp.get(t, tp.client(t), "https://api.test/")
	if status != http.StatusBadGateway || !strings.Contains(b, "credproxy: upstream api.test:443 unreachable") {
		t.Errorf("routed: status %d body %q", status, b)
	}
	// A passed-through tunnel that cannot be dialed is a 502 too.
	_, br, status := tp.connect(t, "nowhere.test:443")
	if status != http.StatusBadGateway {
		t.Errorf("pass-through CONNECT: status %d", status)
	}
	_ = br
	tp.audit.find(t, "denied unreachable", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "upstream unreachable" && r.Service == "nowhere.test"
	})
}

func TestUnroutedPlainUnderTunnelPassesWithoutCredential(t *testing.T) {
	up := startUpstream(t, nil)
	tp := startProxy(t, proxySetup{def: "tunnel", routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"free.test": up.addr()}})
	req, _ := http.NewRequest(http.MethodGet, "http://free.test/x", nil)
	req.Header.Set("Proxy-Authorization", "Basic eDp5")
	if status, _ := tp.do(t, tp.client(t), req); status != 200 {
		t.Fatalf("status %d", status)
	}
	s := up.requests()[0]
	if s.TLS || len(s.Header.Values("Authorization")) != 0 || s.Header.Get("Proxy-Authorization") != "" {
		t.Errorf("passed-through request: tls=%v headers %v", s.TLS, s.Header)
	}
	rec := tp.audit.find(t, "request", func(r audit.Record) bool { return r.Event == audit.EventRequest })
	if rec.Injected == nil || *rec.Injected || rec.Service != "free.test" {
		t.Errorf("record %+v", rec)
	}
}

func TestNonProxyRequestAndNestedConnect(t *testing.T) {
	tp, _, _ := apiSetup(t)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp := tp.rawRequest(t, c, bufio.NewReader(c), "GET /metrics HTTP/1.1\r\nHost: "+tp.addr+"\r\n\r\n")
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body(resp), "forward proxy") {
		t.Errorf("origin-form request: %d %q", resp.StatusCode, body(resp))
	}
	tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	resp = tp.rawRequest(t, tc, bufio.NewReader(tc), "CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n")
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("CONNECT inside a tunnel: %d", resp.StatusCode)
	}
}

func TestDebugLogRedactsHeaderValues(t *testing.T) {
	tp, _, _ := apiSetup(t)
	req, _ := http.NewRequest(http.MethodGet, "https://api.test/x", nil)
	// Letters, not digits: "4242" once matched a port or a timestamp.
	req.Header.Set("Authorization", "Bearer app-value-qzxjv")
	req.Header.Set("Cookie", "session=cookie-value-qzxjv")
	tp.do(t, tp.client(t), req)
	tp.audit.find(t, "request", func(r audit.Record) bool { return r.Event == audit.EventRequest })
	logs := tp.logs.String()
	if !strings.Contains(logs, `"Authorization":"REDACTED"`) || !strings.Contains(logs, `"Cookie":"REDACTED"`) {
		t.Errorf("no redacted debug request line:\n%s", logs)
	}
	if strings.Contains(logs, "qzxjv") {
		t.Errorf("a header value reached the log:\n%s", logs)
	}
}

func TestServeConnAndMetrics(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	dir := t.TempDir()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	st, _ := credentials.NewStatic(map[string]string{"token": testToken})
	store := credentials.NewStore(map[string]credentials.Source{"tok": st}, credentials.Options{})
	defer store.Close(context.Background())
	m := proxy.NewMetrics()
	p, err := New(Options{
		Config: config.HTTP{CA: config.HTTPCA{CertFile: dir + "/" + CACertFile, KeyFile: dir + "/" + CAKeyFile},
			UpstreamCAFile: pki.file, Routes: []config.HTTPRoute{headerRoute("api.test")}},
		Credentials: store, Metrics: m,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, up.addr())
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	client, server := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.ServeConn(ctx, server, "sess-1") }()
	client.SetDeadline(time.Now().Add(ioTimeout))
	io.WriteString(client, "GET http://api.test/o HTTP/1.1\r\nHost: api.test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	cancel() // closes the connection
	select {
	case <-done:
	case <-time.After(ioTimeout):
		t.Fatal("ServeConn did not return after its context ended")
	}
	client.Close()
	want := map[string]string{"route": "api.test", "code": "200", "injected": "true"}
	if v := metricValue(t, m, "credproxy_http_requests_total", want); v != 1 {
		t.Errorf("credproxy_http_requests_total%v = %v, want 1", want, v)
	}
	if n := seriesCount(t, m, "credproxy_http_requests_total"); n != 1 {
		t.Errorf("credproxy_http_requests_total has %d series, want 1", n)
	}
	if err := p.Close(); err != nil {
		t.Error(err)
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown after Close: %v", err)
	}
	if err := p.ServeConn(context.Background(), server, "late"); err != ErrClosed {
		t.Errorf("ServeConn after Close = %v", err)
	}
}

func TestNewRejects(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	ca := config.HTTPCA{CertFile: dir + "/" + CACertFile, KeyFile: dir + "/" + CAKeyFile}
	bad := headerRoute("api.test")
	bad.Inject.Header.Value = "{{ .token"
	for name, cfg := range map[string]config.HTTP{
		"default":     {CA: ca, Default: "allow"},
		"template":    {CA: ca, Routes: []config.HTTPRoute{bad}},
		"route host":  {CA: ca, Routes: []config.HTTPRoute{headerRoute("*.")}},
		"no CA":       {CA: config.HTTPCA{CertFile: dir + "/missing.pem", KeyFile: ca.KeyFile}},
		"upstream CA": {CA: ca, UpstreamCAFile: ca.KeyFile},
	} {
		if p, err := New(Options{Config: cfg, Credentials: failingCreds{}}); err == nil {
			p.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}
