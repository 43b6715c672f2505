package httpproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
)

// wireSetup routes api.test (TLS upstream) and plain.test:80 (upstream:
// http) to wire-level upstreams, so tests see the request line credproxy
// actually sent.
func wireSetup(t testing.TB) (tp *testProxy, tlsUp, clearUp *wireUpstream) {
	t.Helper()
	pki := newTestPKI(t)
	tlsUp = startWireUpstream(t, pki, "api.test")
	clearUp = startWireUpstream(t, nil)
	plain := headerRoute("plain.test:80")
	plain.Upstream = "http"
	tp = startProxy(t, proxySetup{
		routes: []config.HTTPRoute{headerRoute("api.test"), plain},
		upCA:   pki,
		dial:   map[string]string{"api.test:443": tlsUp.addr(), "plain.test:80": clearUp.addr()},
	})
	return tp, tlsUp, clearUp
}

// The three ways a request reaches the proxy.
const (
	viaTLSTunnel   = "TLS tunnel"       // CONNECT api.test:443, TLS inside
	viaClearTunnel = "cleartext tunnel" // CONNECT plain.test:80, HTTP/1.1 inside
	viaPlain       = "proxy listener"   // absolute-form on the proxy connection
)

// send writes raw on a fresh connection of the given kind and returns the
// proxy's response.
func (tp *testProxy) send(t *testing.T, via, raw string) *http.Response {
	t.Helper()
	switch via {
	case viaTLSTunnel:
		tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tc.Close() })
		_ = tc.SetDeadline(time.Now().Add(ioTimeout))
		return tp.rawRequest(t, tc, bufio.NewReader(tc), raw)
	case viaClearTunnel:
		c, br, status := tp.connect(t, "plain.test:80")
		if status != http.StatusOK {
			t.Fatalf("CONNECT plain.test:80: %d", status)
		}
		return tp.rawRequest(t, c, br, raw)
	default:
		c, err := net.DialTimeout("tcp", tp.addr, ioTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		return tp.rawRequest(t, c, bufio.NewReader(c), raw)
	}
}

// hostFor is the Host header an app sends on each path.
func hostFor(via string) string {
	if via == viaTLSTunnel {
		return "api.test"
	}
	return "plain.test"
}

// countDenied waits for n denied records with the given reason and status.
func (tp *testProxy) countDenied(t *testing.T, reason string, status, n int) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		got := 0
		for _, r := range tp.audit.records() {
			if r.Event == audit.EventDenied && r.Reason == reason && r.Status == status {
				got++
			}
		}
		if got == n {
			return
		}
		if got > n || time.Now().After(deadline) {
			t.Fatalf("%d denied records (%s, %d), want %d; have %+v", got, reason, status, n, tp.audit.records())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Issue 8, item 1: only origin-form, or absolute-form naming exactly the
// routed authority, is accepted, and only origin-form goes upstream. An
// opaque target ("https:http://evil.test/x") has no URL host for the Host
// check to compare, and used to be written upstream as it came: an
// absolute-form target naming another host, credential attached.
func TestRequestTargetForms(t *testing.T) {
	tp, tlsUp, clearUp := wireSetup(t)
	refused := 0
	for _, tc := range []struct {
		via, line string
		status    int
		wire      string // the request line the upstream must see; "" = none
	}{
		{viaTLSTunnel, "GET /ok?q=1 HTTP/1.1", 200, "GET /ok?q=1 HTTP/1.1"},
		{viaTLSTunnel, "GET https://api.test/ok?q=1 HTTP/1.1", 200, "GET /ok?q=1 HTTP/1.1"},
		{viaTLSTunnel, "GET https://API.test.:443 HTTP/1.1", 200, "GET / HTTP/1.1"},
		{viaTLSTunnel, "GET https:http://evil.test/x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https:evil.test/x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https:%2F%2Fevil.test/x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https:///x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https://user:pw@api.test/x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https://api.test@evil.test/x HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET https://api.test/x#frag HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET /x#frag HTTP/1.1", 400, ""},
		{viaTLSTunnel, "OPTIONS * HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET api.test:443 HTTP/1.1", 400, ""},
		{viaTLSTunnel, "GET ftp://api.test/x HTTP/1.1", 400, ""},
		{viaClearTunnel, "GET /ok HTTP/1.1", 200, "GET /ok HTTP/1.1"},
		{viaClearTunnel, "GET http://plain.test/ok HTTP/1.1", 200, "GET /ok HTTP/1.1"},
		{viaClearTunnel, "GET http:http://evil.test/x HTTP/1.1", 400, ""},
		{viaClearTunnel, "GET http:evil.test/x HTTP/1.1", 400, ""},
		{viaClearTunnel, "GET http://plain.test/x#f HTTP/1.1", 400, ""},
		{viaClearTunnel, "OPTIONS * HTTP/1.1", 400, ""},
		{viaClearTunnel, "GET plain.test:80 HTTP/1.1", 400, ""},
		{viaPlain, "GET http://plain.test/ok?a=b HTTP/1.1", 200, "GET /ok?a=b HTTP/1.1"},
		{viaPlain, "GET http://plain.test HTTP/1.1", 200, "GET / HTTP/1.1"},
		{viaPlain, "OPTIONS http://plain.test HTTP/1.1", 200, "OPTIONS / HTTP/1.1"},
		{viaPlain, "GET http://user:pw@plain.test/x HTTP/1.1", 400, ""},
		{viaPlain, "GET http://plain.test@evil.test/x HTTP/1.1", 400, ""},
		{viaPlain, "GET http://plain.test/x#frag HTTP/1.1", 400, ""},
		{viaPlain, "GET http:http://evil.test/x HTTP/1.1", 400, ""},
		{viaPlain, "GET http:plain.test/x HTTP/1.1", 400, ""},
		{viaPlain, "GET plain.test:80 HTTP/1.1", 400, ""},
		{viaPlain, "OPTIONS * HTTP/1.1", 400, ""},
		{viaPlain, "GET /x HTTP/1.1", 400, ""},
	} {
		t.Run(tc.via+" "+tc.line, func(t *testing.T) {
			tlsBefore, clearBefore := len(tlsUp.requests()), len(clearUp.requests())
			resp := tp.send(t, tc.via, tc.line+"\r\nHost: "+hostFor(tc.via)+"\r\n\r\n")
			b := body(resp)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %q", resp.StatusCode, tc.status, b)
			}
			newTLS, newClear := tlsUp.requests()[tlsBefore:], clearUp.requests()[clearBefore:]
			if tc.wire == "" {
				refused++
				if !strings.HasPrefix(b, "credproxy: ") {
					t.Errorf("body %q: not credproxy's refusal", b)
				}
				if tc.via != viaPlain && !resp.Close {
					t.Error("the tunnel stays open after a refused target")
				}
				if len(newTLS)+len(newClear) != 0 {
					t.Errorf("upstream saw %+v %+v", newTLS, newClear)
				}
				return
			}
			got, want := newClear, "plain.test"
			if tc.via == viaTLSTunnel {
				got, want = newTLS, "api.test"
			}
			if len(got) != 1 || got[0].Line != tc.wire {
				t.Fatalf("upstream saw %+v, want %q", got, tc.wire)
			}
			if v := originFormViolation(got[0], want); v != "" {
				t.Error(v)
			}
		})
	}
	tp.countDenied(t, "bad request", http.StatusBadRequest, refused)
}

// Issue 8, item 5: an h2 client that ignores ALPN sends the preface
// inside the TLS tunnel; it is refused there, as in a cleartext tunnel,
// and nothing goes upstream.
func TestH2PrefaceInTLSTunnelRefused(t *testing.T) {
	tp, tlsUp, _ := wireSetup(t)
	tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(ioTimeout))
	resp := tp.rawRequest(t, tc, bufio.NewReader(tc), h2Preface)
	if b := body(resp); resp.StatusCode != http.StatusHTTPVersionNotSupported || !strings.Contains(b, "HTTP/2 is not supported") {
		t.Errorf("status %d body %q", resp.StatusCode, b)
	}
	rec := tp.audit.find(t, "denied h2", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "unsupported protocol"
	})
	// Refused on the tunnel, before any request was parsed.
	if rec.Service != "api.test" || rec.Host != "api.test" || rec.Method != http.MethodConnect || rec.Status != http.StatusHTTPVersionNotSupported {
		t.Errorf("denied record %+v", rec)
	}
	if n := len(tlsUp.requests()); n != 0 {
		t.Errorf("upstream saw %+v", tlsUp.requests())
	}
	// The same tunnel kind still serves HTTP/1.1, including a client that
	// leaves right after the handshake.
	tc2, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	tc2.Close()
	if resp := tp.send(t, viaTLSTunnel, "GET /fine HTTP/1.1\r\nHost: api.test\r\n\r\n"); resp.StatusCode != 200 {
		t.Errorf("HTTP/1.1 after: status %d", resp.StatusCode)
	}
}

// sendRaw writes raw on a fresh connection of the given kind and reads
// until the proxy closes it; a proxy that keeps it open fails the test.
func (tp *testProxy) sendRaw(t *testing.T, via, raw string) {
	t.Helper()
	var c net.Conn
	var r io.Reader
	switch via {
	case viaTLSTunnel:
		tc, err := tp.tlsTunnel(t, "api.test:443", "api.test", nil)
		if err != nil {
			t.Fatal(err)
		}
		c, r = tc, tc
	case viaClearTunnel:
		cc, br, status := tp.connect(t, "plain.test:80")
		if status != http.StatusOK {
			t.Fatalf("CONNECT plain.test:80: %d", status)
		}
		c, r = cc, br
	default:
		cc, err := net.DialTimeout("tcp", tp.addr, ioTimeout)
		if err != nil {
			t.Fatal(err)
		}
		c, r = cc, cc
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatalf("%s: write: %v", via, err)
	}
	b, err := io.ReadAll(r)
	tp.bodies.Write(b)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: the proxy kept the connection open after %q", via, raw)
	}
}
