package httpproxy

import (
	"bufio"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
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

// Issue 8, item 2: TRACE and TRACK echo the request, injected
// credential included; on a route they are refused. PRI is never a
// method credproxy forwards (item 5), on any path.
func TestEchoAndPRIMethodsRefused(t *testing.T) {
	tp, tlsUp, clearUp := wireSetup(t)
	var methodRefusals, h2Refusals int
	for _, via := range []string{viaTLSTunnel, viaClearTunnel, viaPlain} {
		target := "/x"
		if via == viaPlain {
			target = "http://plain.test/x"
		}
		for _, tc := range []struct {
			line   string
			status int
		}{
			{"TRACE " + target + " HTTP/1.1", http.StatusMethodNotAllowed},
			{"TRACK " + target + " HTTP/1.1", http.StatusMethodNotAllowed},
			{"trace " + target + " HTTP/1.1", http.StatusMethodNotAllowed},
			{"PRI " + target + " HTTP/1.1", http.StatusMethodNotAllowed},
			{"PRI * HTTP/2.0", http.StatusHTTPVersionNotSupported},
		} {
			t.Run(via+" "+tc.line, func(t *testing.T) {
				resp := tp.send(t, via, tc.line+"\r\nHost: "+hostFor(via)+"\r\n\r\n")
				if b := body(resp); resp.StatusCode != tc.status || !strings.HasPrefix(b, "credproxy: ") {
					t.Errorf("status %d body %q, want %d", resp.StatusCode, b, tc.status)
				}
				if tc.status == http.StatusMethodNotAllowed {
					methodRefusals++
				} else {
					h2Refusals++
				}
			})
		}
	}
	if n := len(tlsUp.requests()) + len(clearUp.requests()); n != 0 {
		t.Errorf("upstream saw %d requests: %+v %+v", n, tlsUp.requests(), clearUp.requests())
	}
	tp.countDenied(t, "method not allowed", http.StatusMethodNotAllowed, methodRefusals)
	tp.countDenied(t, "unsupported protocol", http.StatusHTTPVersionNotSupported, h2Refusals)
	// A Go client's TRACE, too.
	req, _ := http.NewRequest(http.MethodTrace, "https://api.test/echo", nil)
	if status, _ := tp.do(t, tp.client(t), req); status != http.StatusMethodNotAllowed {
		t.Errorf("Go client TRACE: status %d", status)
	}
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

// lowerHexEscape is url.QueryEscape with lower-case hex digits, as some
// servers re-encode.
func lowerHexEscape(s string) string {
	e := url.QueryEscape(s)
	var b strings.Builder
	for i := 0; i < len(e); i++ {
		if e[i] == '%' && i+2 < len(e) {
			b.WriteString("%" + strings.ToLower(e[i+1:i+3]))
			i += 2
			continue
		}
		b.WriteByte(e[i])
	}
	return b.String()
}

// jsEscape escapes like JavaScript's encodeURIComponent: !'()* stay raw.
func jsEscape(s string) string {
	r := strings.NewReplacer("%21", "!", "%27", "'", "%28", "(", "%29", ")", "%2A", "*", "+", "%20")
	return r.Replace(url.QueryEscape(s))
}

// Issue 8, item 2: what the upstream echoes in response headers never
// hands the app the injected value. A stock ServeMux redirects
// /files?page=2 to /files/?page=2&api_key=<the key>; the app gets the
// redirect with the key's value REDACTED, and following it works,
// because the query injector replaces the parameter again.
func TestResponseHeadersScrubbed(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "q.test", "h.test")
	mux := http.NewServeMux()
	mux.HandleFunc("/files/", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "files "+r.URL.Query().Get("page"))
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Query().Get("api_key")
		if key == "" {
			key = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		}
		h := w.Header()
		h.Set("Content-Location", "/echo?api_key="+url.QueryEscape(key)+"&v=1")
		h.Set("Link", "</next?api_key="+url.PathEscape(key)+">; rel=next")
		h.Set("Refresh", "0; url=/x?api_key="+lowerHexEscape(key))
		h.Add("Set-Cookie", "s=1; Path=/p/"+url.PathEscape(key)+"; HttpOnly")
		h.Set("X-Raw", "got "+key)
		h.Set("X-B64", base64.StdEncoding.EncodeToString([]byte(key)))
		h.Set("X-B64url", base64.RawURLEncoding.EncodeToString([]byte(key)))
		h.Set("X-JS", "/y?k="+jsEscape(key)+"&z=2")
		h.Set("X-Twice", url.QueryEscape(url.QueryEscape(key)))
		h.Set("X-Auth-Echo", r.Header.Get("Authorization"))
		h.Set("X-Kept", "plain value")
		h.Set("Trailer", "X-Echo-Trailer")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "echoed")
		h.Set("X-Echo-Trailer", "got "+url.QueryEscape(key))
	})
	up.setHandler(mux.ServeHTTP)
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{
		{Host: "q.test", Credentials: "api", Inject: config.Inject{Query: &config.NameValue{Name: "api_key", Value: "{{ .key }}"}}},
		headerRoute("h.test"),
	}, upCA: pki, dial: map[string]string{"q.test": up.addr(), "h.test": up.addr()}})
	c := tp.client(t)

	leaked := func(t *testing.T, h http.Header) {
		t.Helper()
		for k, vs := range h {
			for _, v := range vs {
				if echoesSecret(v) {
					t.Errorf("%s: %q hands the app a secret", k, v)
				}
			}
		}
	}

	t.Run("stock mux redirect", func(t *testing.T) {
		resp, err := c.Get("https://q.test/files?page=2")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		tp.bodies.Write(b)
		leaked(t, resp.Header)
		if loc := resp.Header.Get("Location"); resp.StatusCode/100 != 3 || loc != "/files/?page=2&api_key=REDACTED" {
			t.Errorf("status %d Location %q", resp.StatusCode, loc)
		}
		// The body net/http's redirect writes links to the same URL.
		if len(b) != 0 || resp.Header.Get("Content-Length") != "0" {
			t.Errorf("redirect body %q (Content-Length %q) kept", b, resp.Header.Get("Content-Length"))
		}
		// Following it reaches the files, with the real key again.
		c2 := tp.client(t)
		c2.CheckRedirect = nil
		if status, b := tp.get(t, c2, "https://q.test/files?page=3"); status != 200 || b != "files 3" {
			t.Errorf("followed: %d %q", status, b)
		}
		last := up.requests()[len(up.requests())-1]
		if q, _ := url.ParseQuery(last.RawQuery); q.Get("api_key") != testAPIKey || q.Get("page") != "3" || len(q["api_key"]) != 1 {
			t.Errorf("the followed request did not carry the injected key once")
		}
	})
	for _, host := range []string{"q.test", "h.test"} {
		t.Run("echo on "+host, func(t *testing.T) {
			resp, err := c.Get("https://" + host + "/echo")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			tp.bodies.Write(b)
			if resp.StatusCode != 200 || string(b) != "echoed" {
				t.Fatalf("status %d body %q", resp.StatusCode, b)
			}
			leaked(t, resp.Header)
			leaked(t, resp.Trailer)
			if got := resp.Trailer.Get("X-Echo-Trailer"); got != "got REDACTED" {
				t.Errorf("trailer X-Echo-Trailer = %q", got)
			}
			if resp.Header.Get("X-Kept") != "plain value" {
				t.Error("an unrelated header was changed")
			}
			if host == "q.test" {
				for k, want := range map[string]string{
					"Content-Location": "/echo?api_key=REDACTED&v=1",
					"Link":             "</next?api_key=REDACTED>; rel=next",
					"Refresh":          "0; url=/x?api_key=REDACTED",
					"X-Raw":            "got REDACTED",
					"X-Js":             "/y?k=REDACTED&z=2",
				} {
					if got := resp.Header.Get(k); got != want {
						t.Errorf("%s = %q, want %q", k, got, want)
					}
				}
			} else if got := resp.Header.Get("X-Auth-Echo"); got != "REDACTED" {
				t.Errorf("X-Auth-Echo = %q", got)
			}
		})
	}
}

// echoesSecret reports whether v carries a test secret in any form
// secretForms lists, or once percent-decoded (in either reading of '+',
// up to three times over).
func echoesSecret(v string) bool {
	has := func(s string) bool {
		for _, f := range secretForms() {
			if strings.Contains(s, f) {
				return true
			}
		}
		return false
	}
	level := []string{v}
	for range 4 {
		if slices.ContainsFunc(level, has) {
			return true
		}
		var next []string
		for _, s := range level {
			if d, err := url.PathUnescape(s); err == nil && d != s {
				next = append(next, d)
			}
			if d, err := url.QueryUnescape(s); err == nil && d != s {
				next = append(next, d)
			}
		}
		level = next
	}
	return false
}

func TestEchoScrubberValues(t *testing.T) {
	s := newEchoScrubber(map[string]string{"key": testAPIKey}, []string{url.QueryEscape(testAPIKey)})
	for _, tc := range []struct{ in, want string }{
		{"/files/?page=2&api_key=" + url.QueryEscape(testAPIKey), "/files/?page=2&api_key=REDACTED"},
		{"s=1; Path=/p/" + url.PathEscape(testAPIKey) + "; HttpOnly", "s=1; Path=/p/REDACTED; HttpOnly"},
		{"0; url=/x?api_key=" + lowerHexEscape(testAPIKey) + "&b=1", "0; url=/x?api_key=REDACTED&b=1"},
		{"/y?k=" + jsEscape(testAPIKey) + "&z=2", "/y?k=REDACTED&z=2"},
		{"/y?k=" + url.QueryEscape(url.QueryEscape(testAPIKey)), "/y?k=REDACTED"},
		{"/y/" + strings.ReplaceAll(url.PathEscape(testAPIKey), "%3F", "%3f") + "/z", "REDACTED"},
		{base64.StdEncoding.EncodeToString([]byte(testAPIKey)), "REDACTED"},
		{"got " + testAPIKey, "got REDACTED"},
		{"text/html; charset=utf-8", "text/html; charset=utf-8"},
		{"a+b%20c%zz", "a+b%20c%zz"},
		{"key with", "key with"},
	} {
		got, changed := s.value(tc.in)
		if got != tc.want || changed != (tc.in != tc.want) {
			t.Errorf("value(%q) = %q, %v; want %q", tc.in, got, changed, tc.want)
		}
		if echoesSecret(got) {
			t.Errorf("value(%q) = %q still carries the secret", tc.in, got)
		}
	}
	h := http.Header{"X-" + url.QueryEscape(testToken): {"1"}, "Location": {"/a?api_key=" + url.QueryEscape(testAPIKey)}, "Date": {"today"}}
	s = newEchoScrubber(map[string]string{"key": testAPIKey, "token": testToken}, nil)
	names := s.header(h)
	slices.Sort(names)
	if len(h) != 2 || h.Get("Location") != "/a?api_key=REDACTED" || h.Get("Date") != "today" || len(names) != 2 {
		t.Errorf("header: %v, changed %v", h, names)
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

// Only the fields an injector reads are scrubbed from responses: a
// credential's other fields ("enabled": "true") may be ordinary words.
func TestTemplateFields(t *testing.T) {
	for _, tc := range []struct {
		tmpl string
		want []string
		all  bool
	}{
		{"Bearer {{ .token }}", []string{"token"}, false},
		{"{{ .a }}:{{ .b }}", []string{"a", "b"}, false},
		{`{{ printf "%s" .token }}`, []string{"token"}, false},
		{`{{ .token | printf "%s" }}`, []string{"token"}, false},
		{"{{ $.token }}", []string{"token"}, false},
		{"{{ $t := .token }}{{ $t }}", []string{"token"}, false},
		{"{{ if .x }}{{ .y }}{{ else }}{{ .z }}{{ end }}", []string{"x", "y", "z"}, false},
		{"static", nil, false},
		{`{{ index . "token" }}`, nil, true},
		{"{{ with .token }}{{ . }}{{ end }}", []string{"token"}, true},
		{"{{ $ }}", nil, true},
	} {
		tm, err := parseTemplate("t", tc.tmpl)
		if err != nil {
			t.Fatal(err)
		}
		got := templateFields(tm)
		if !slices.Equal(got.names, tc.want) || got.all != tc.all {
			t.Errorf("%s: %+v, want %v all=%v", tc.tmpl, got, tc.want, tc.all)
		}
	}
	inj := mustInjector(t, config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .token }}"}})
	s := newEchoScrubber(inj.Uses().pick(map[string]string{"token": testToken, "enabled": "true"}), []string{"Bearer " + testToken})
	h := http.Header{"X-Flag": {"true"}, "X-Echo": {"Bearer " + testToken}}
	s.header(h)
	if h.Get("X-Flag") != "true" || h.Get("X-Echo") != "REDACTED" {
		t.Errorf("headers %v", h)
	}
}

// BenchmarkEchoScrub is the per-request cost of response scrubbing on a
// header route: compiling the forms once, then a typical set of headers
// that carry nothing.
func BenchmarkEchoScrub(b *testing.B) {
	inj := &headerInjector{name: "Authorization", fieldUse: fieldUse{names: []string{"token"}}}
	fields := map[string]string{"token": testToken}
	base := http.Header{
		"Content-Type":   {"application/json; charset=utf-8"},
		"Content-Length": {"1234"},
		"Date":           {"Mon, 02 Jan 2006 15:04:05 GMT"},
		"Cache-Control":  {"private, max-age=60, s-maxage=60"},
		"Etag":           {`W/"0a1b2c3d4e5f"`},
		"Vary":           {"Accept, Authorization, Cookie"},
		"X-Request-Id":   {"4f1c2a7e-8b9d-4e0f-a1b2-c3d4e5f60718"},
		"Link":           {`<https://api.test/items?page=2&per_page=50>; rel="next"`},
		"Set-Cookie":     {"session=abc%2Fdef%3D; Path=/; Secure; HttpOnly"},
		"Server":         {"nginx"},
	}
	b.ReportAllocs()
	for b.Loop() {
		s := newEchoScrubber(inj.Uses().pick(fields), []string{"Bearer " + testToken})
		h := base.Clone()
		s.header(h)
	}
}
