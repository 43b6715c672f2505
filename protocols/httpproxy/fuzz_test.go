package httpproxy

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
	"testing"
	"text/template"

	"github.com/credproxy/credproxy/config"
)

// FuzzHostMatch: any authority either fails to parse or yields a canonical
// host and port that round-trip; a route matches it only when the host is
// the route's host exactly, or strictly below a wildcard's domain.
func FuzzHostMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"allowed.test:443", "allowed.test"},
		{"allowed.test.evil.test:443", "allowed.test"},
		{"ALLOWED.TEST.:443", "allowed.test"},
		{"a.allowed.test", "*.allowed.test"},
		{"allowed.test", "*.allowed.test"},
		{"xallowed.test", "*.allowed.test"},
		{"[::1]:443", "[::1]:443"},
		{"allowed.test:8443", "allowed.test:8443"},
		{"allowed.test%2eevil", "allowed.test"},
		{"10.0.0.1:443", "10.0.0.1"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, auth, pattern string) {
		host, port, err := splitAuthority(auth, portHTTPS)
		if err != nil {
			return
		}
		if host != strings.ToLower(host) || strings.HasSuffix(host, ".") || host == "" {
			t.Fatalf("host %q not canonical", host)
		}
		if ip := net.ParseIP(host); ip == nil {
			for _, c := range host {
				if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
					t.Fatalf("host %q has %q", host, c)
				}
			}
		}
		h2, p2, err := splitAuthority(net.JoinHostPort(host, port), "1")
		if err != nil || h2 != host || p2 != port {
			t.Fatalf("round trip %q:%q -> %q:%q %v", host, port, h2, p2, err)
		}
		table, err := newRouteTable([]config.HTTPRoute{headerRoute(pattern)})
		if err != nil {
			return
		}
		r := table.match(host, port, portHTTPS)
		if r == nil {
			return
		}
		if r.wildcard {
			if !strings.HasSuffix(host, "."+r.host) || host == r.host {
				t.Fatalf("%q matched wildcard %q", host, pattern)
			}
		} else if host != r.host {
			t.Fatalf("%q matched %q", host, pattern)
		}
		if want := r.port; want != "" && want != port || want == "" && port != portHTTPS {
			t.Fatalf("port %s matched %q", port, pattern)
		}
	})
}

// FuzzHeaderHygiene: whatever headers the app sends, after hygiene and
// injection the upstream gets the injected Authorization exactly once and
// no hop-by-hop, Proxy-* or Connection-named header.
func FuzzHeaderHygiene(f *testing.F) {
	f.Add("Connection: Authorization\r\nAuthorization: Bearer app\r\n")
	f.Add("Connection: keep-alive, X-A\r\nX-A: 1\r\nProxy-Authorization: x\r\nauthorization: y\r\n")
	f.Add("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n")
	f.Add("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n")
	f.Add("Connection: ,,, authorization ,\r\nTE: trailers\r\nKeep-Alive: 1\r\n")
	inj := &headerInjector{name: "Authorization", value: mustTemplateNamed(f, "header.value", "Bearer {{ .token }}")}
	f.Fuzz(func(t *testing.T, raw string) {
		tr := textproto.NewReader(bufio.NewReader(strings.NewReader(raw + "\r\n")))
		mh, err := tr.ReadMIMEHeader()
		if err != nil {
			return
		}
		h := http.Header(mh)
		named := map[string]bool{}
		for _, v := range h.Values("Connection") {
			for tok := range strings.SplitSeq(v, ",") {
				named[textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(tok))] = true
			}
		}
		ws := isWebSocket(h)
		sanitizeHeaders(h, true)
		req := &http.Request{Header: h, URL: &url.URL{}}
		if err := inj.Inject(context.Background(), req, map[string]string{"token": testToken}); err != nil {
			t.Fatal(err)
		}
		if got := h.Values("Authorization"); len(got) != 1 || got[0] != "Bearer "+testToken {
			t.Fatalf("Authorization = %q", got)
		}
		for k := range h {
			ck := textproto.CanonicalMIMEHeaderKey(k)
			if ws && (ck == "Connection" || ck == "Upgrade") {
				continue
			}
			if ck == "Authorization" {
				continue
			}
			if isHopByHop(ck) || named[ck] {
				t.Fatalf("%q survived", k)
			}
		}
	})
}

// FuzzInjectValues: any secret value and any app query string: the query
// injector leaves exactly one parameter of its name carrying the value and
// every other parameter as it was; the header injector sets the value or
// refuses it, and no error message contains it.
func FuzzInjectValues(f *testing.F) {
	f.Add("tok", "a=1&b=2")
	f.Add("v&api_key=evil", "api_key=app&api%5fkey=x")
	f.Add("a b+c/d?e#f", "x=1;api_key=y&z")
	f.Add("line\r\nX-Evil: 1", "")
	f.Add("%zz", "%zz=1&api_key")
	q := &queryInjector{name: "api_key", value: mustTemplateNamed(f, "query.value", "{{ .v }}")}
	h := &headerInjector{name: "X-Key", value: mustTemplateNamed(f, "header.value", "k={{ .v }}")}
	f.Fuzz(func(t *testing.T, secret, rawQuery string) {
		u, err := url.Parse("https://api.test/p")
		if err != nil {
			t.Fatal(err)
		}
		u.RawQuery = rawQuery
		req := &http.Request{URL: u, Header: http.Header{}}
		fields := map[string]string{"v": secret}
		if err := q.Inject(context.Background(), req, fields); err != nil {
			t.Fatal(err)
		}
		var kept, ours int
		for _, p := range strings.Split(req.URL.RawQuery, "&") {
			if queryPieceNames(p, "api_key") {
				ours++
				if p != "api_key="+url.QueryEscape(secret) {
					t.Fatalf("piece %q", p)
				}
				continue
			}
			kept++
		}
		if ours != 1 {
			t.Fatalf("%d api_key pieces in %q", ours, req.URL.RawQuery)
		}
		var want int
		for _, p := range strings.Split(rawQuery, "&") {
			if p != "" && !queryPieceNames(p, "api_key") {
				want++
			}
		}
		if kept != want {
			t.Fatalf("kept %d of %d other pieces", kept, want)
		}
		err = h.Inject(context.Background(), req, fields)
		if err != nil {
			if len(secret) >= minScrubLen && strings.Contains(err.Error(), secret) {
				t.Fatal("error shows the value")
			}
			if validHeaderValue("k=" + secret) {
				t.Fatalf("refused a valid value: %v", err)
			}
			return
		}
		if req.Header.Get("X-Key") != "k="+secret {
			t.Fatal("header value")
		}
		s := newScrubber(fields)
		s.add(h.Placed(req)...)
		if len(secret) >= minScrubLen && strings.Contains(s.scrub("error: "+secret+" "+url.QueryEscape(secret)), secret) {
			t.Fatal("scrubber kept the value")
		}
	})
}

func mustTemplateNamed(f *testing.F, name, s string) *template.Template {
	t, err := parseTemplate(name, s)
	if err != nil {
		f.Fatal(err)
	}
	return t
}

// FuzzInnerRequestLine sends a request line and a Host through all three
// ways into the proxy (a TLS tunnel to api.test, a cleartext tunnel to
// plain.test:80, the proxy listener itself) and checks what the
// upstreams got on the wire: only origin-form requests, for the route's
// host and nothing else, never an absolute or opaque target, never
// TRACE, TRACK or PRI; and nothing but the two routed authorities was
// dialed.
func FuzzInnerRequestLine(f *testing.F) {
	for _, s := range [][2]string{
		{"GET /ok?q=1 HTTP/1.1", "api.test"},
		{"GET https://api.test/x HTTP/1.1", "api.test"},
		{"GET http://plain.test/x HTTP/1.1", "plain.test"},
		{"GET https:http://evil.test/x HTTP/1.1", "api.test"},
		{"GET http:http://evil.test/x HTTP/1.1", "plain.test"},
		{"GET http:evil.test/x HTTP/1.1", "plain.test"},
		{"GET https:evil.test:443/x HTTP/1.1", "api.test"},
		{"GET https:/%2F%2Fevil.test/x HTTP/1.1", "api.test"},
		{"GET http://evil.test@plain.test/x HTTP/1.1", "plain.test"},
		{"GET http://plain.test@evil.test/x HTTP/1.1", "plain.test"},
		{"GET http://plain.test/x#@evil.test HTTP/1.1", "plain.test"},
		{"GET HTTP://PLAIN.TEST./x HTTP/1.1", "evil.test"},
		{"GET /x HTTP/1.1", "evil.test"},
		{"GET /x HTTP/1.0", ""},
		{"GET //evil.test/x HTTP/1.1", "api.test"},
		{"GET api.test:443 HTTP/1.1", "api.test"},
		{"GET plain.test:80 HTTP/1.1", "plain.test"},
		{"OPTIONS * HTTP/1.1", "api.test"},
		{"PRI * HTTP/2.0", ""},
		{"TRACE / HTTP/1.1", "api.test"},
		{"track http://plain.test/ HTTP/1.1", "plain.test"},
		{"HEAD http://plain.test HTTP/1.1", "plain.test"},
	} {
		f.Add(s[0], s[1])
	}
	tp, tlsUp, clearUp := wireSetup(f)
	var checked struct{ tls, clear int }
	f.Fuzz(func(t *testing.T, line, host string) {
		if strings.ContainsAny(line+host, "\r\n") {
			return // one request line and one Host: the fuzzed part is the request-target
		}
		raw := line + "\r\nHost: " + host + "\r\nConnection: close\r\n\r\n"
		method, _, _ := strings.Cut(line, " ")
		for _, via := range []string{viaTLSTunnel, viaClearTunnel, viaPlain} {
			if via == viaPlain && strings.EqualFold(method, http.MethodConnect) {
				continue // a tunnel, which waits for bytes this test does not send
			}
			tp.sendRaw(t, via, raw)
		}
		for _, s := range tlsUp.requests()[checked.tls:] {
			if v := originFormViolation(s, "api.test"); v != "" {
				t.Errorf("TLS upstream, after %q Host %q: %s", line, host, v)
			}
		}
		for _, s := range clearUp.requests()[checked.clear:] {
			if v := originFormViolation(s, "plain.test"); v != "" {
				t.Errorf("cleartext upstream, after %q Host %q: %s", line, host, v)
			}
		}
		checked.tls, checked.clear = len(tlsUp.requests()), len(clearUp.requests())
		for _, d := range tp.dialed.all() {
			if d != "api.test:443" && d != "plain.test:80" {
				t.Fatalf("dialed %s after %q Host %q", d, line, host)
			}
		}
	})
}
