package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
)

// Real clients through the real proxy: each asserts the upstream saw
// exactly one correct credential.

func TestHTTPCurl(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	want := "Bearer " + h.creds.token

	status, body, all, err := h.curl(h.caFile, "-H", "Authorization: Bearer the-app-has-its-own", "https://allowed.com/repos?per_page=5")
	if err != nil || status != "200" || !strings.HasPrefix(body, "ok allowed.com /repos") {
		t.Fatalf("curl https: status %s err %v\n%s", status, err, all)
	}
	status, _, all, err = h.curl(h.caFile, "http://allowed.com/plain")
	if err != nil || status != "200" {
		t.Fatalf("curl http: status %s err %v\n%s", status, err, all)
	}
	reqs := h.up.requests()
	if len(reqs) != 2 {
		t.Fatalf("upstream saw %d requests, want 2", len(reqs))
	}
	for _, s := range reqs {
		wantAuthOnce(t, s, want)
		if s.Host != "allowed.com" {
			t.Errorf("upstream Host %q", s.Host)
		}
	}
	// The plain-HTTP request reached the TLS-only upstream: sent over HTTPS.
	rec := h.waitAudit("request for /repos", func(r audit.Record) bool { return r.Event == audit.EventRequest && r.Path == "/repos" })
	if rec.Protocol != "http" || rec.Service != "allowed.com" || rec.Host != "allowed.com" || rec.Method != "GET" || rec.Status != 200 ||
		rec.Injected == nil || !*rec.Injected || rec.BytesIn == nil || rec.BytesOut == nil || *rec.BytesOut == 0 || rec.DurationMS == nil ||
		rec.SessionID == "" || rec.Client.Addr == "" {
		t.Errorf("request record %+v", rec)
	}
	h.waitAudit("session_start", func(r audit.Record) bool {
		return r.Event == audit.EventSessionStart && r.Upstream == "allowed.com:443" && r.Credential == "github"
	})
	h.waitAudit("session_end", func(r audit.Record) bool {
		return r.Event == audit.EventSessionEnd && r.BytesIn != nil && *r.BytesIn > 0 && r.Error != nil
	})
}

func TestHTTPGoClient(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{
		httpHeaderRoute("allowed.com"),
		{Host: "api.allowed.com", Credentials: "basic", Inject: config.Inject{Basic: &config.Basic{Username: "{{ .username }}", Password: "{{ .password }}"}}},
		{Host: "*.evil.com", Credentials: "apikey", Inject: config.Inject{Query: &config.NameValue{Name: "api_key", Value: "{{ .key }}"}}},
	}})
	c := h.goClient(false)
	for _, u := range []string{"https://allowed.com/a", "https://api.allowed.com/b", "https://allowed.com.evil.com/c?q=1&api_key=mine"} {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Authorization", "Bearer app")
		status, body, err := h.goDo(c, req)
		if err != nil || status != 200 {
			t.Fatalf("%s: %d %v %q", u, status, err, body)
		}
	}
	reqs := h.up.requests()
	if len(reqs) != 3 {
		t.Fatalf("upstream saw %d requests", len(reqs))
	}
	wantAuthOnce(t, reqs[0], "Bearer "+h.creds.token)
	wantAuthOnce(t, reqs[1], "Basic "+base64.StdEncoding.EncodeToString([]byte(h.creds.user+":"+h.creds.password)))
	// The query route replaces the app's api_key; the app's Authorization
	// passes untouched (the route injects nothing there).
	q, _ := url.ParseQuery(reqs[2].RawQuery)
	if got := q["api_key"]; len(got) != 1 || got[0] != h.creds.apiKey || q.Get("q") != "1" {
		t.Errorf("query injection: %d api_key values", len(got))
	}
	rec := h.waitAudit("query route", func(r audit.Record) bool { return r.Event == audit.EventRequest && r.Service == "*.evil.com" })
	if rec.Path != "/c" || rec.Host != "allowed.com.evil.com" {
		t.Errorf("audit path %q host %q (no query string allowed)", rec.Path, rec.Host)
	}
}

const nodeClient = `
const http = require('http'), https = require('https'), tls = require('tls');
const [host, port] = process.env.PROXY_ADDR.split(':');
const target = process.argv[2], path = process.argv[3];
const req = http.request({host, port: +port, method: 'CONNECT', path: target + ':443', headers: {Host: target + ':443'}});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.log('CONNECT ' + res.statusCode); process.exit(2); }
  // No agent: the request goes on the connection createConnection makes.
  const r = https.request({host: target, port: 443, path, method: 'GET',
      headers: {'Authorization': 'Bearer node-app-own'},
      createConnection: () => tls.connect({socket, servername: target})}, (resp) => {
    let body = '';
    resp.on('data', (d) => body += d);
    resp.on('end', () => { console.log(resp.statusCode + ' ' + body.trim()); socket.end(); process.exit(0); });
  });
  r.on('error', (e) => { console.error('request: ' + e.message); process.exit(3); });
  r.end();
});
req.on('error', (e) => { console.error('proxy: ' + e.message); process.exit(4); });
req.end();
`

// Node with NODE_EXTRA_CA_CERTS and an HTTPS-over-CONNECT agent written
// with node's own http and tls modules.
func TestHTTPNodeClient(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	script := filepath.Join(t.TempDir(), "client.js")
	httpWriteFile(t, script, nodeClient)
	out, all, err := h.run(h.clientEnv("PROXY_ADDR="+h.addr, "NODE_EXTRA_CA_CERTS="+h.caFile), "node", script, "allowed.com", "/node")
	if err != nil || !strings.HasPrefix(out, "200 ok allowed.com /node") {
		t.Fatalf("node: %v\n%s", err, all)
	}
	reqs := h.up.requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream saw %d requests", len(reqs))
	}
	wantAuthOnce(t, reqs[0], "Bearer "+h.creds.token)
	// Without the CA, node refuses the interception certificate.
	if _, all, err := h.run(h.clientEnv("PROXY_ADDR="+h.addr), "node", script, "allowed.com", "/untrusted"); err == nil {
		t.Errorf("node trusted the interception CA without NODE_EXTRA_CA_CERTS:\n%s", all)
	}
}

const pythonClient = `
import os, sys, urllib.request
proxy = os.environ["PROXY_URL"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": proxy, "http": proxy}))
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Basic cHl0aG9uOm93bg=="})
with opener.open(req, timeout=15) as r:
    print(r.status, r.read().decode().strip())
`

// Python urllib trusting the CA through SSL_CERT_FILE (REQUESTS_CA_BUNDLE
// set too, as for requests).
func TestHTTPPythonClient(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{
		{Host: "api.allowed.com", Credentials: "basic", Inject: config.Inject{Basic: &config.Basic{Username: "{{ .username }}", Password: "{{ .password }}"}}},
	}})
	script := filepath.Join(t.TempDir(), "client.py")
	httpWriteFile(t, script, pythonClient)
	out, all, err := h.run(h.clientEnv("PROXY_URL="+h.proxyURL(), "SSL_CERT_FILE="+h.caFile, "REQUESTS_CA_BUNDLE="+h.caFile),
		"python3", script, "https://api.allowed.com/py")
	if err != nil || !strings.HasPrefix(out, "200 ok api.allowed.com /py") {
		t.Fatalf("python: %v\n%s", err, all)
	}
	reqs := h.up.requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream saw %d requests", len(reqs))
	}
	wantAuthOnce(t, reqs[0], "Basic "+base64.StdEncoding.EncodeToString([]byte(h.creds.user+":"+h.creds.password)))
}

// SigV4: the upstream verifies the signature with the secret key, using
// the same signer, on unsigned requests and on requests the app signed
// with dummy keys.
func TestHTTPSigV4(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{
		{Host: "s3.allowed.com", Credentials: "aws", Inject: config.Inject{AWSSigV4: &config.AWSSigV4{Service: "s3", Region: "us-east-1"}}},
	}})
	verdict := make(chan error, 4)
	h.up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		err := httpVerifySigV4(r, body, h.creds.accessKey, h.creds.secretKey, "s3", "us-east-1")
		if err == nil && httpVerifySigV4(r, body, h.creds.accessKey, "wrong-key", "s3", "us-east-1") == nil {
			err = errors.New("the verifier accepts any key")
		}
		verdict <- err
		if err != nil {
			http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
			return
		}
		io.WriteString(w, "stored\n")
	})
	c := h.goClient(false)
	for _, tc := range []struct {
		name   string
		req    func() *http.Request
		status int
	}{
		{"unsigned PUT", func() *http.Request {
			r, _ := http.NewRequest(http.MethodPut, "https://s3.allowed.com/bucket/some%20key.txt", strings.NewReader("object body"))
			return r
		}, 200},
		{"signed with dummy keys", func() *http.Request {
			r, _ := http.NewRequest(http.MethodGet, "https://s3.allowed.com/bucket?list-type=2&prefix=a/b", nil)
			r.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDUMMY/20200101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0000")
			r.Header.Set("X-Amz-Date", "20200101T000000Z")
			r.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
			return r
		}, 200},
	} {
		status, body, err := h.goDo(c, tc.req())
		if err != nil || status != tc.status {
			t.Errorf("%s: %d %v %q", tc.name, status, err, body)
		}
		select {
		case err := <-verdict:
			if err != nil {
				t.Errorf("%s: upstream: %v", tc.name, err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("%s: upstream saw nothing", tc.name)
		}
	}
}

// httpVerifySigV4 re-signs what the upstream received with the secret and
// compares.
func httpVerifySigV4(r *http.Request, body []byte, accessKey, secretKey, service, region string) error {
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 Credential="+accessKey+"/") {
		return errors.New("not signed with the injected access key")
	}
	var signed []string
	for part := range strings.SplitSeq(strings.TrimPrefix(auth, "AWS4-HMAC-SHA256 "), ", ") {
		if v, ok := strings.CutPrefix(part, "SignedHeaders="); ok {
			signed = strings.Split(v, ";")
		}
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil || time.Since(when) > 5*time.Minute {
		return fmt.Errorf("X-Amz-Date %q", r.Header.Get("X-Amz-Date"))
	}
	check, _ := http.NewRequest(r.Method, "https://"+r.Host+r.RequestURI, bytes.NewReader(body))
	check.ContentLength = int64(len(body))
	for _, k := range signed {
		if k != "host" && k != "content-length" {
			check.Header[http.CanonicalHeaderKey(k)] = r.Header.Values(k)
		}
	}
	hash := r.Header.Get("X-Amz-Content-Sha256")
	if sum := sha256.Sum256(body); hash != "UNSIGNED-PAYLOAD" && hash != hex.EncodeToString(sum[:]) {
		return errors.New("payload hash does not match the body")
	}
	if err := v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: accessKey, SecretAccessKey: secretKey},
		check, hash, service, region, when, func(o *v4.SignerOptions) { o.DisableURIPathEscaping = service == "s3" }); err != nil {
		return err
	}
	if check.Header.Get("Authorization") != auth {
		return errors.New("signature does not verify")
	}
	return nil
}

// ---- security cases ----

// CONNECT to an unrouted host, then an inner request naming the routed
// one: refused at CONNECT under deny (no tunnel, no certificate); passed
// through untouched, without a credential, under tunnel.
func TestHTTPConnectUnroutedThenInnerAllowedHost(t *testing.T) {
	t.Parallel()
	t.Run("deny", func(t *testing.T) {
		h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
		_, br, status := h.rawConnect("evil.com:443")
		if status != http.StatusForbidden {
			t.Fatalf("CONNECT evil.com: %d", status)
		}
		if _, err := br.Peek(1); err == nil {
			t.Error("tunnel bytes after a refused CONNECT")
		}
		if n := h.certsIssuedFor("evil.com"); n != 0 {
			t.Errorf("%d certificates minted for evil.com", n)
		}
		if d := h.dialed(); len(h.up.requests()) != 0 || len(d) != 0 {
			t.Errorf("upstream contacted: %v", d)
		}
		rec := h.waitAudit("denied", func(r audit.Record) bool { return r.Event == audit.EventDenied })
		if rec.Reason != "no route" || rec.Service != "evil.com" || rec.Method != "CONNECT" {
			t.Errorf("denied record %+v", rec)
		}
	})
	t.Run("tunnel", func(t *testing.T) {
		h := startHTTPProxy(t, httpSetup{def: "tunnel", routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
		c, _, status := h.rawConnect("evil.com:443")
		if status != http.StatusOK {
			t.Fatalf("CONNECT evil.com: %d", status)
		}
		// End to end TLS with the real (test) evil.com: credproxy cannot
		// see inside, let alone inject.
		tc := tls.Client(c, &tls.Config{ServerName: "evil.com", RootCAs: poolOf(h.pki)})
		if err := tc.Handshake(); err != nil {
			t.Fatalf("TLS to evil.com through the tunnel: %v", err)
		}
		fmt.Fprintf(tc, "GET /steal HTTP/1.1\r\nHost: allowed.com\r\n\r\n")
		resp, _ := h.readResponse(bufio.NewReader(tc))
		if resp.StatusCode != 200 {
			t.Errorf("status %d", resp.StatusCode)
		}
		reqs := h.up.requests()
		if len(reqs) != 1 || len(reqs[0].Header.Values("Authorization")) != 0 {
			t.Errorf("evil.com saw a credential")
		}
		if n := h.certsIssuedFor("evil.com") + h.certsIssuedFor("allowed.com"); n != 0 {
			t.Errorf("%d certificates minted for a passed-through tunnel", n)
		}
	})
}

// CONNECT to the routed host, then an inner request for another host (in
// every spelling): 403, and the tunnel is closed.
func TestHTTPConnectAllowedThenInnerEvilHost(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	for _, raw := range []string{
		"GET /x HTTP/1.1\r\nHost: evil.com\r\n\r\n",
		"GET https://evil.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
		"GET /x HTTP/1.1\r\nHost: allowed.com:8443\r\n\r\n",
		"GET /x HTTP/1.1\r\nHost: allowed.com.evil.com\r\n\r\n",
	} {
		resp, body := h.inTLSTunnel("allowed.com:443", "allowed.com", raw)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "inside a tunnel to allowed.com:443") || !resp.Close {
			t.Errorf("%q: status %d close %v body %q", raw, resp.StatusCode, resp.Close, body)
		}
	}
	if n := len(h.up.requests()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
	h.waitAudit("host mismatch", func(r audit.Record) bool { return r.Event == audit.EventDenied && r.Reason == "host mismatch" })
}

func TestHTTPSNIDifferentFromConnect(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	c, _, _ := h.rawConnect("allowed.com:443")
	if _, err := h.tlsInTunnel(c, "evil.com", false); err == nil {
		t.Error("a verifying client accepted the certificate for SNI evil.com")
	}
	c, _, _ = h.rawConnect("allowed.com:443")
	tc, err := h.tlsInTunnel(c, "evil.com", true)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "GET / HTTP/1.1\r\nHost: allowed.com\r\n\r\n")
	resp, body := h.readResponse(bufio.NewReader(tc))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, `TLS server name "evil.com"`) {
		t.Errorf("status %d body %q", resp.StatusCode, body)
	}
	if len(h.up.requests()) != 0 || h.certsIssuedFor("evil.com") != 0 {
		t.Errorf("upstream contacted or certificate minted for evil.com")
	}
}

// A 302 to another host is handed to the app; the app's next request (to
// a host passed through untouched) carries no credential.
func TestHTTPRedirectToAnotherHost(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{def: "tunnel", routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	h.up.setHandler(func(w http.ResponseWriter, r *http.Request, _ []byte) {
		if r.Host == "allowed.com" {
			http.Redirect(w, r, "https://other.com/landing", http.StatusFound)
			return
		}
		io.WriteString(w, "landed on "+r.Host+"\n")
	})
	// curl -L trusts both the interception CA and other.com's own CA.
	status, body, all, err := h.curl(h.bundle, "-L", "https://allowed.com/start")
	if err != nil || status != "200" || !strings.Contains(body, "landed on other.com") {
		t.Fatalf("curl -L: %s %v\n%s", status, err, all)
	}
	// Go's client does the same.
	if status, body, err := h.goDo(h.goClient(true, h.pki.cert), mustRequest(t, "https://allowed.com/start")); err != nil || status != 200 {
		t.Fatalf("go: %d %v %q", status, err, body)
	}
	var allowed, other int
	for _, s := range h.up.requests() {
		switch s.Host {
		case "allowed.com":
			allowed++
			wantAuthOnce(t, s, "Bearer "+h.creds.token)
		case "other.com":
			other++
			if len(s.Header.Values("Authorization")) != 0 {
				t.Error("the redirect target got a credential")
			}
		}
	}
	if allowed != 2 || other != 2 {
		t.Errorf("allowed.com %d, other.com %d requests; want 2 and 2", allowed, other)
	}
	h.waitAudit("302 handed back", func(r audit.Record) bool { return r.Event == audit.EventRequest && r.Status == 302 })
}

func mustRequest(t *testing.T, u string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// allowed.com.evil.com is not allowed.com; case, a trailing dot and an
// explicit :443 are.
func TestHTTPHostSpellings(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	for _, u := range []string{"https://ALLOWED.COM/upper", "https://allowed.com./dot", "https://allowed.com:443/port", "http://Allowed.Com./plain"} {
		status, _, all, err := h.curl(h.caFile, u)
		if err != nil || status != "200" {
			t.Errorf("%s: %s %v\n%s", u, status, err, all)
		}
	}
	for _, s := range h.up.requests() {
		wantAuthOnce(t, s, "Bearer "+h.creds.token)
		if s.Host != "allowed.com" {
			t.Errorf("upstream Host %q: the proxy pins it to the matched host", s.Host)
		}
	}
	n := len(h.up.requests())
	for _, u := range []string{"https://allowed.com.evil.com/", "https://allowed.com:8443/", "https://xallowed.com/"} {
		status, _, all, err := h.curl(h.caFile, u)
		if err == nil || status != "403" {
			t.Errorf("%s: %s %v\n%s", u, status, err, all)
		}
	}
	status, body, _, _ := h.curl(h.caFile, "http://allowed.com.evil.com/")
	if status != "403" || !strings.Contains(body, "no route for allowed.com.evil.com:80") {
		t.Errorf("plain lookalike: %s %q", status, body)
	}
	if len(h.up.requests()) != n {
		t.Error("a lookalike host reached an upstream")
	}
}

// The app's own Authorization and query key are replaced; a Connection
// header naming Authorization removes only the app's copy.
func TestHTTPAppCredentialReplacedAndConnectionTrick(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	want := "Bearer " + h.creds.token
	for _, args := range [][]string{
		{"-H", "Authorization: Bearer app-own", "https://allowed.com/own"},
		{"-H", "Connection: Authorization", "https://allowed.com/conn"},
		{"-H", "Connection: close, Authorization, X-Drop", "-H", "X-Drop: 1", "-H", "Authorization: Bearer app", "http://allowed.com/conn-plain"},
	} {
		if status, _, all, err := h.curl(h.caFile, args...); err != nil || status != "200" {
			t.Fatalf("curl %v: %s %v\n%s", args, status, err, all)
		}
	}
	// And raw, inside a tunnel, with Authorization listed twice.
	c, _, _ := h.rawConnect("allowed.com:443")
	tc, err := h.tlsInTunnel(c, "allowed.com", false)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "GET /raw HTTP/1.1\r\nHost: allowed.com\r\nConnection: Authorization\r\nConnection: authorization, keep-alive\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n")
	if resp, _ := h.readResponse(bufio.NewReader(tc)); resp.StatusCode != 200 {
		t.Fatalf("raw: %d", resp.StatusCode)
	}
	for _, s := range h.up.requests() {
		wantAuthOnce(t, s, want)
		if s.Header.Get("X-Drop") != "" || s.Header.Get("Connection") != "" {
			t.Errorf("%s: Connection-named headers passed: %v", s.Path, s.Header)
		}
	}
}

// A second request for another host, pipelined on the same tunnel behind
// a good one, is refused and ends the tunnel.
func TestHTTPPipelinedRequestForAnotherHost(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	c, _, _ := h.rawConnect("allowed.com:443")
	tc, err := h.tlsInTunnel(c, "allowed.com", false)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "GET /one HTTP/1.1\r\nHost: allowed.com\r\n\r\nGET /two HTTP/1.1\r\nHost: evil.com\r\n\r\nGET /three HTTP/1.1\r\nHost: allowed.com\r\n\r\n")
	br := bufio.NewReader(tc)
	r1, _ := h.readResponse(br)
	r2, body := h.readResponse(br)
	if r1.StatusCode != 200 || r2.StatusCode != http.StatusForbidden || !strings.Contains(body, "evil.com") {
		t.Fatalf("statuses %d %d %q", r1.StatusCode, r2.StatusCode, body)
	}
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Error("the tunnel served a third request after the refusal")
	}
	if reqs := h.up.requests(); len(reqs) != 1 || reqs[0].Path != "/one" {
		t.Errorf("upstream saw %d requests", len(reqs))
	}
}

// An upstream whose certificate credproxy does not trust gets nothing:
// 502, naming the cause.
func TestHTTPUntrustedUpstream(t *testing.T) {
	t.Parallel()
	other := newHTTPPKI(t) // not the CA in upstream_ca_file
	cert := other.serverCert(t, httpHosts...)
	up := startHTTPUpstream(t, &cert)
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}, upstream: up})
	for _, u := range []string{"https://allowed.com/", "http://allowed.com/"} {
		status, body, _, _ := h.curl(h.caFile, u)
		if status != "502" || !strings.Contains(body, "upstream allowed.com:443 TLS verification failed") {
			t.Errorf("%s: %s %q", u, status, body)
		}
	}
	if n := len(up.requests()); n != 0 {
		t.Errorf("untrusted upstream got %d requests", n)
	}
	h.waitAudit("upstream TLS denied", func(r audit.Record) bool { return r.Event == audit.EventDenied && r.Reason == "upstream TLS failed" })
}

// An unrouted host under deny: 403 for CONNECT and for plain HTTP, and no
// certificate is ever minted for it.
func TestHTTPUnroutedDeniedNoCertificate(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	status, _, all, err := h.curl(h.caFile, "https://evil.com/")
	if err == nil || status != "403" {
		t.Errorf("curl https://evil.com: %s %v\n%s", status, err, all)
	}
	status, body, _, err := h.curl(h.caFile, "http://evil.com/")
	if err != nil || status != "403" || !strings.Contains(body, "credproxy: no route for evil.com:80 (http.default: deny)") {
		t.Errorf("curl http://evil.com: %s %q %v", status, body, err)
	}
	if status, body, err := h.goDo(h.goClient(false), mustRequest(t, "https://evil.com/")); err == nil {
		t.Errorf("go client reached evil.com: %d %q", status, body)
	}
	if n := h.certsIssuedFor("evil.com"); n != 0 {
		t.Errorf("%d certificates minted for evil.com", n)
	}
	if d := h.dialed(); len(d) != 0 || len(h.up.requests()) != 0 {
		t.Errorf("dialed %v", d)
	}
	// The records are written as each exchange finishes, just after the
	// client has its answer.
	deadline := time.Now().Add(5 * time.Second)
	for {
		recs := 0
		for _, r := range h.auditRecords() {
			if r.Event == audit.EventDenied && r.Reason == "no route" && r.Service == "evil.com" {
				recs++
			}
		}
		if recs == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d denied records, want 3", recs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// HTTP/2 is refused rather than allowed to bypass injection: clients that
// offer h2 and http/1.1 get http/1.1; one that insists on h2 fails the
// handshake.
func TestHTTPHTTP2Refused(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	_, _, all, err := h.curl(h.caFile, "--http2", "-w", "\n%{http_code} HTTP/%{http_version}", "https://allowed.com/h2")
	if err != nil || !strings.HasSuffix(strings.TrimSpace(all), "200 HTTP/1.1") {
		t.Errorf("curl --http2: %v\n%s", err, all)
	}
	c, _, _ := h.rawConnect("allowed.com:443")
	tc := tls.Client(c, &tls.Config{ServerName: "allowed.com", RootCAs: h.caPool(), NextProtos: []string{"h2"}})
	if err := tc.Handshake(); err == nil {
		t.Errorf("h2-only handshake succeeded (negotiated %q)", tc.ConnectionState().NegotiatedProtocol)
	}
	for _, s := range h.up.requests() {
		wantAuthOnce(t, s, "Bearer "+h.creds.token)
	}
}

// Header values never reach the debug log; the audit record and logs have
// what an operator needs.
func TestHTTPDebugLogRedactsHeaders(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	if status, _, all, err := h.curl(h.caFile, "-H", "X-App-Secret: app-value-0123", "https://allowed.com/dbg"); err != nil || status != "200" {
		t.Fatalf("curl: %s %v\n%s", status, err, all)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !bytes.Contains(h.logs.Bytes(), []byte(`"X-App-Secret":"REDACTED"`)) {
		if time.Now().After(deadline) {
			t.Fatalf("no debug request line with redacted headers:\n%s", tail(h.logs.Bytes(), 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if bytes.Contains(h.logs.Bytes(), []byte("app-value-0123")) {
		t.Error("a header value reached the log")
	}
}

// ---- request hygiene (issue 8) ----

// An opaque request-target has no URL host, so it used to pass the Host
// check inside a tunnel and go upstream as it came: an absolute-form
// target naming another host, which a host-routed server (Go's own)
// serves as that host, credential attached. Every target that is not
// origin-form or an absolute URL naming the tunnel's host is refused, on
// the proxy listener too, and only origin-form goes upstream.
func TestHTTPOpaqueAndOddTargetsRefused(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	for _, raw := range []string{
		"GET https:http://evil.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
		"GET https:evil.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
		"GET https://someone@allowed.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
	} {
		resp, body := h.inTLSTunnel("allowed.com:443", "allowed.com", raw)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "request-target") || !resp.Close {
			t.Errorf("%q: status %d close %v body %q", raw, resp.StatusCode, resp.Close, body)
		}
	}
	// On the proxy listener: userinfo and an opaque URL.
	for _, raw := range []string{
		"GET http://someone:pw@allowed.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
		"GET http:http://evil.com/x HTTP/1.1\r\nHost: allowed.com\r\n\r\n",
	} {
		c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(15 * time.Second))
		io.WriteString(c, raw)
		resp, body := h.readResponse(bufio.NewReader(c))
		c.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "request-target") {
			t.Errorf("%q: status %d body %q", raw, resp.StatusCode, body)
		}
	}
	if reqs := h.up.requests(); len(reqs) != 0 {
		t.Errorf("upstream saw %+v", reqs)
	}
	// What is accepted goes upstream in origin-form.
	if resp, _ := h.inTLSTunnel("allowed.com:443", "allowed.com", "GET https://allowed.com/abs?q=1 HTTP/1.1\r\nHost: evil.com\r\n\r\n"); resp.StatusCode != 200 {
		t.Fatalf("absolute-form for the tunnel's host: %d", resp.StatusCode)
	}
	if status, _, all, err := h.curl(h.caFile, "http://allowed.com/plain?q=2"); err != nil || status != "200" {
		t.Fatalf("curl: %s %v\n%s", status, err, all)
	}
	reqs := h.up.requests()
	if len(reqs) != 2 || reqs[0].RequestURI != "/abs?q=1" || reqs[1].RequestURI != "/plain?q=2" {
		t.Errorf("upstream saw %+v", reqs)
	}
	for _, s := range reqs {
		if s.Host != "allowed.com" {
			t.Errorf("upstream Host %q", s.Host)
		}
	}
	h.waitAudit("bad request", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "bad request" && r.Status == http.StatusBadRequest && r.Service == "allowed.com"
	})
}

// TRACE would echo the injected Authorization; a query key that a stock
// ServeMux puts in a redirect's Location comes back REDACTED, and curl -L
// still lands, with the key injected again.
func TestHTTPTraceRefusedAndRedirectScrubbed(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{
		httpHeaderRoute("allowed.com"),
		{Host: "api.allowed.com", Credentials: "apikey", Inject: config.Inject{Query: &config.NameValue{Name: "api_key", Value: "{{ .key }}"}}},
	}})
	mux := http.NewServeMux()
	mux.HandleFunc("/files/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "files page %s key-ok=%v\n", r.URL.Query().Get("page"), r.URL.Query().Get("api_key") == h.creds.apiKey)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// A server with TRACE on: the request comes back.
		w.Header().Set("Content-Type", "message/http")
		r.Write(w)
	})
	h.up.setHandler(func(w http.ResponseWriter, r *http.Request, _ []byte) { mux.ServeHTTP(w, r) })

	for _, u := range []string{"https://allowed.com/", "http://allowed.com/"} {
		status, body, all, _ := h.curl(h.caFile, "-X", "TRACE", u)
		if status != "405" || !strings.Contains(body, "TRACE is not allowed on route allowed.com") {
			t.Errorf("curl -X TRACE %s: %s\n%s", u, status, all)
		}
	}
	if n := len(h.up.requests()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
	h.waitAudit("TRACE denied", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "method not allowed" && r.Method == "TRACE" && r.Status == 405
	})

	// curl -i shows the redirect's headers; the collector checks its
	// whole output for the key in every form.
	status, out, all, err := h.curl(h.caFile, "-i", "https://api.allowed.com/files?page=2")
	if err != nil || status[0] != '3' || !strings.Contains(out, "Location: /files/?page=2&api_key=REDACTED") {
		t.Errorf("redirect: %s %v\n%s", status, err, all)
	}
	status, body, all, err := h.curl(h.caFile, "-L", "https://api.allowed.com/files?page=3")
	if err != nil || status != "200" || strings.TrimSpace(body) != "files page 3 key-ok=true" {
		t.Errorf("curl -L: %s %v %q\n%s", status, err, body, all)
	}
}

// An h2 client that ignores ALPN sends the preface inside the TLS tunnel:
// 505, a denied record, nothing upstream.
func TestHTTPH2PrefaceInTLSTunnel(t *testing.T) {
	t.Parallel()
	h := startHTTPProxy(t, httpSetup{routes: []config.HTTPRoute{httpHeaderRoute("allowed.com")}})
	resp, body := h.inTLSTunnel("allowed.com:443", "allowed.com", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	if resp.StatusCode != http.StatusHTTPVersionNotSupported || !strings.Contains(body, "HTTP/2 is not supported") {
		t.Errorf("status %d body %q", resp.StatusCode, body)
	}
	if n := len(h.up.requests()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
	h.waitAudit("h2 denied", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "unsupported protocol" && r.Method == "CONNECT" && r.Status == 505
	})
}
