package httpproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

func mustInjector(t *testing.T, in config.Inject) injector {
	t.Helper()
	inj, err := newInjector(in)
	if err != nil {
		t.Fatalf("newInjector: %v", err)
	}
	return inj
}

func TestInjectors(t *testing.T) {
	fields := map[string]string{"token": testToken, "username": testUser, "password": testPassword, "key": testAPIKey}
	for _, tc := range []struct {
		name  string
		in    config.Inject
		url   string
		hdr   http.Header
		check func(t *testing.T, r *http.Request)
	}{
		{
			name: "header replaces the app's, any case",
			in:   config.Inject{Header: &config.NameValue{Name: "authorization", Value: "Bearer {{ .token }}"}},
			hdr:  http.Header{"Authorization": {"Bearer app"}, "authorization": {"x"}},
			check: func(t *testing.T, r *http.Request) {
				var n int
				for k, vs := range r.Header {
					if strings.EqualFold(k, "authorization") {
						n += len(vs)
					}
				}
				if n != 1 || r.Header.Get("Authorization") != "Bearer "+testToken {
					t.Errorf("Authorization values %v", r.Header)
				}
			},
		},
		{
			name: "custom header",
			in:   config.Inject{Header: &config.NameValue{Name: "X-Api-Key", Value: "{{ .key }}"}},
			check: func(t *testing.T, r *http.Request) {
				if r.Header.Get("X-Api-Key") != testAPIKey {
					t.Error("X-Api-Key not set")
				}
			},
		},
		{
			name: "basic",
			in:   config.Inject{Basic: &config.Basic{Username: "{{ .username }}", Password: "{{ .password }}"}},
			hdr:  http.Header{"Authorization": {"Basic Zm9vOmJhcg=="}},
			check: func(t *testing.T, r *http.Request) {
				u, p, ok := r.BasicAuth()
				if !ok || u != testUser || p != testPassword || len(r.Header.Values("Authorization")) != 1 {
					t.Errorf("basic auth %q %v", u, ok)
				}
			},
		},
		{
			name: "query replaces every spelling, keeps the rest byte for byte",
			in:   config.Inject{Query: &config.NameValue{Name: "api_key", Value: "{{ .key }}"}},
			url:  "https://api.test/p?b=2&api_key=app&a=%20x+y&api%5Fkey=smuggled&x=1;api_key=semi&z",
			check: func(t *testing.T, r *http.Request) {
				q, _ := url.ParseQuery(strings.ReplaceAll(r.URL.RawQuery, ";", "%3B"))
				if got := q["api_key"]; len(got) != 1 || got[0] != testAPIKey {
					t.Errorf("api_key = %q in %q", got, r.URL.RawQuery)
				}
				if !strings.HasPrefix(r.URL.RawQuery, "b=2&a=%20x+y&z&api_key=") {
					t.Errorf("RawQuery %q", r.URL.RawQuery)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := tc.url
			if u == "" {
				u = "https://api.test/p"
			}
			r, _ := http.NewRequest(http.MethodGet, u, nil)
			for k, v := range tc.hdr {
				r.Header[k] = v
			}
			inj := mustInjector(t, tc.in)
			if err := inj.Inject(context.Background(), r, fields); err != nil {
				t.Fatal(err)
			}
			tc.check(t, r)
			s := newScrubber(fields)
			s.add(inj.Placed(r)...)
			for _, v := range inj.Placed(r) {
				if got := s.scrub("x " + v + " y"); strings.Contains(got, v) {
					t.Errorf("scrubber kept %q", got)
				}
			}
		})
	}
}

func TestInjectErrorsNameNoValue(t *testing.T) {
	fields := map[string]string{"token": "bad\r\nX-Evil: 1" + testToken}
	for _, tc := range []struct {
		in   config.Inject
		want string
	}{
		{config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .missing }}"}}, `map has no entry for key "missing"`},
		{config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .token }}"}}, "not a valid header value"},
		{config.Inject{Basic: &config.Basic{Username: "a:{{ .token }}", Password: ""}}, "containing ':'"},
		{config.Inject{AWSSigV4: &config.AWSSigV4{Service: "s3", Region: "r"}}, "needs fields access_key and secret_key"},
	} {
		r, _ := http.NewRequest(http.MethodGet, "https://api.test/", nil)
		err := mustInjector(t, tc.in).Inject(context.Background(), r, fields)
		var ie *injectError
		if !errors.As(err, &ie) || ie.status != http.StatusServiceUnavailable || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("err = %v, want %q", err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), testToken) {
			t.Errorf("error shows the value: %v", err)
		}
	}
}

func TestNewInjectorRejects(t *testing.T) {
	for _, in := range []config.Inject{
		{},
		{Header: &config.NameValue{Name: "Connection", Value: "x"}},
		{Header: &config.NameValue{Name: "Proxy-Authorization", Value: "x"}},
		{Header: &config.NameValue{Name: "Bad Name", Value: "x"}},
		{Header: &config.NameValue{Name: "X", Value: "{{ .a "}},
		{Query: &config.NameValue{Name: "", Value: "x"}},
		{AWSSigV4: &config.AWSSigV4{Service: "s3"}},
	} {
		if _, err := newInjector(in); err == nil {
			t.Errorf("newInjector(%+v) accepted", in)
		}
	}
}

func TestSanitizeHeaders(t *testing.T) {
	h := http.Header{
		"Connection":          {"keep-alive, X-Named", "close"},
		"X-Named":             {"v"},
		"Keep-Alive":          {"timeout=5"},
		"Proxy-Authorization": {"Basic x"},
		"Proxy-Anything":      {"x"},
		"proxy-lower":         {"x"},
		"Te":                  {"trailers"},
		"Upgrade":             {"h2c"},
		"Http2-Settings":      {"x"},
		"Authorization":       {"kept"},
	}
	sanitizeHeaders(h, true)
	if len(h) != 1 || h.Get("Authorization") != "kept" {
		t.Errorf("left %v", h)
	}
	ws := http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Key": {"k"}}
	sanitizeHeaders(ws, true)
	if ws.Get("Connection") != "Upgrade" || ws.Get("Upgrade") != "websocket" || ws.Get("Sec-Websocket-Key") != "k" {
		t.Errorf("websocket upgrade lost: %v", ws)
	}
	sanitizeHeaders(ws, false)
	if ws.Get("Upgrade") != "" {
		t.Errorf("upgrade kept: %v", ws)
	}
}

// verifySigV4 checks a request the upstream received: it signs the same
// request again with the secret key, using the same signer, and compares.
func verifySigV4(r *http.Request, body []byte, accessKey, secretKey, service, region string) error {
	auth := r.Header.Get("Authorization")
	const prefix = "AWS4-HMAC-SHA256 Credential="
	if !strings.HasPrefix(auth, prefix) {
		return fmt.Errorf("Authorization is not SigV4: %.30q", auth)
	}
	var signed []string
	for part := range strings.SplitSeq(strings.TrimPrefix(auth, "AWS4-HMAC-SHA256 "), ", ") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "Credential":
			if !strings.HasPrefix(v, accessKey+"/") || !strings.HasSuffix(v, "/"+region+"/"+service+"/aws4_request") {
				return fmt.Errorf("credential scope %q", v)
			}
		case "SignedHeaders":
			signed = strings.Split(v, ";")
		}
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return fmt.Errorf("X-Amz-Date: %w", err)
	}
	if d := time.Since(when); d > 5*time.Minute || d < -5*time.Minute {
		return fmt.Errorf("signed %s ago", d)
	}
	u, err := url.ParseRequestURI(r.RequestURI)
	if err != nil {
		return err
	}
	check, _ := http.NewRequest(r.Method, "https://"+r.Host+u.RequestURI(), bytes.NewReader(body))
	check.Host = r.Host
	check.ContentLength = int64(len(body))
	for _, h := range signed {
		if h == "host" || h == "content-length" {
			continue
		}
		check.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
	}
	hash := r.Header.Get("X-Amz-Content-Sha256")
	if hash == "" {
		sum := sha256.Sum256(body)
		hash = hex.EncodeToString(sum[:])
	} else if hash != "UNSIGNED-PAYLOAD" {
		sum := sha256.Sum256(body)
		if hash != hex.EncodeToString(sum[:]) {
			return errors.New("X-Amz-Content-Sha256 does not match the body")
		}
	}
	err = v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: accessKey, SecretAccessKey: secretKey,
		SessionToken: r.Header.Get("X-Amz-Security-Token")}, check, hash, service, region, when,
		func(o *v4.SignerOptions) { o.DisableURIPathEscaping = service == "s3" })
	if err != nil {
		return err
	}
	if check.Header.Get("Authorization") != auth {
		return errors.New("signature does not verify")
	}
	return nil
}

func TestSigV4ThroughProxy(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "bucket.s3.test", "sqs.test")
	verdicts := make(chan error, 8)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		service := "s3"
		if r.Host == "sqs.test" {
			service = "sqs"
		}
		err := verifySigV4(r, b, testAccessKey, testSecretKey, service, "eu-west-1")
		if err == nil && verifySigV4(r, b, testAccessKey, "not-the-key", service, "eu-west-1") == nil {
			err = errors.New("the verifier accepts any key")
		}
		verdicts <- err
		if err != nil {
			http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
			return
		}
		io.WriteString(w, "ok")
	})
	route := func(host, service string) config.HTTPRoute {
		return config.HTTPRoute{Host: host, Credentials: "aws", Upstream: "https",
			Inject: config.Inject{AWSSigV4: &config.AWSSigV4{Service: service, Region: "eu-west-1"}}}
	}
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{route("bucket.s3.test", "s3"), route("sqs.test", "sqs")}, upCA: pki,
		dial: map[string]string{"bucket.s3.test": up.addr(), "sqs.test": up.addr()}})
	c := tp.client(t)
	for _, tc := range []struct {
		name, method, url, body string
		hdr                     http.Header
	}{
		{"unsigned PUT with a body", http.MethodPut, "https://bucket.s3.test/dir/my%20key.txt?x-id=PutObject", "hello world", nil},
		{"GET, path needing escapes", http.MethodGet, "https://bucket.s3.test/a b/c+d?list-type=2&prefix=a%2Fb", "", nil},
		{"signed by the app with dummy keys", http.MethodPost, "https://sqs.test/", "Action=ListQueues", http.Header{
			"Authorization":        {"AWS4-HMAC-SHA256 Credential=AKIADUMMY/20200101/eu-west-1/sqs/aws4_request, SignedHeaders=host;x-amz-date, Signature=00"},
			"X-Amz-Date":           {"20200101T000000Z"},
			"X-Amz-Security-Token": {"dummy"},
			"Content-Type":         {"application/x-www-form-urlencoded"},
		}},
		{"chunked body over plain http", http.MethodPut, "http://bucket.s3.test/chunked", "streamed", http.Header{"X-Chunked": {"1"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rd io.Reader
			if tc.body != "" {
				rd = strings.NewReader(tc.body)
				if tc.hdr.Get("X-Chunked") != "" {
					rd = io.MultiReader(rd) // unknown length: sent chunked
				}
			}
			req, _ := http.NewRequest(tc.method, tc.url, rd)
			for k, v := range tc.hdr {
				req.Header[k] = v
			}
			status, b := tp.do(t, c, req)
			if err := <-verdicts; err != nil {
				t.Errorf("upstream: %v", err)
			}
			if status != 200 {
				t.Errorf("status %d %q", status, b)
			}
		})
	}
	for _, s := range up.requests() {
		if s.Header.Get("X-Amz-Security-Token") != "" {
			t.Error("the app's session token reached the upstream")
		}
	}
}

func TestSigV4StreamingRefused(t *testing.T) {
	inj := mustInjector(t, config.Inject{AWSSigV4: &config.AWSSigV4{Service: "s3", Region: "r"}})
	r, _ := http.NewRequest(http.MethodPut, "https://b.test/k", strings.NewReader("x"))
	r.Header.Set("X-Amz-Content-Sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
	err := inj.Inject(context.Background(), r, map[string]string{"access_key": "a", "secret_key": "b"})
	var ie *injectError
	if !errors.As(err, &ie) || ie.status != http.StatusBadRequest {
		t.Errorf("err = %v", err)
	}
}

func TestQueryAndBasicThroughProxy(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "q.test", "b.test")
	tp := startProxy(t, proxySetup{routes: []config.HTTPRoute{
		{Host: "q.test", Credentials: "api", Inject: config.Inject{Query: &config.NameValue{Name: "api_key", Value: "{{ .key }}"}}},
		{Host: "b.test", Credentials: "basic", Inject: config.Inject{Basic: &config.Basic{Username: "{{ .username }}", Password: "{{ .password }}"}}},
	}, upCA: pki, dial: map[string]string{"q.test": up.addr(), "b.test": up.addr()}})
	c := tp.client(t)
	tp.get(t, c, "https://q.test/search?q=go&api_key=mine")
	tp.get(t, c, "https://b.test/me")
	reqs := up.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests", len(reqs))
	}
	q, _ := url.ParseQuery(reqs[0].RawQuery)
	if q.Get("q") != "go" || len(q["api_key"]) != 1 || q.Get("api_key") != testAPIKey {
		t.Errorf("query %q", reqs[0].RawQuery)
	}
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte(testUser+":"+testPassword))
	wantOneAuth(t, reqs[1], want)
	rec := tp.audit.find(t, "q.test request", func(r audit.Record) bool { return r.Event == "request" && r.Host == "q.test" })
	if rec.Path != "/search" {
		t.Errorf("audit path %q (must not carry the query)", rec.Path)
	}
}

// Whatever an error message carries, the app, the log and the audit log
// get it with the credential's values redacted in every encoding.
func TestRedactErrorMessages(t *testing.T) {
	st, _ := credentials.NewStatic(map[string]string{"token": testToken, "username": testUser, "password": testPassword})
	store := credentials.NewStore(map[string]credentials.Source{"c": st}, credentials.Options{})
	defer store.Close(context.Background())
	h, err := store.Acquire(context.Background(), "c")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	x := &exchange{handle: h, placed: []string{"Bearer " + testToken}}
	basic := base64.StdEncoding.EncodeToString([]byte(testUser + ":" + testPassword))
	msg := x.redact(fmt.Sprintf("upstream said: Bearer %s; %s; %s; %s; Basic %s", testToken,
		base64.StdEncoding.EncodeToString([]byte(testToken)), url.QueryEscape(testPassword), url.PathEscape(testPassword), basic))
	for _, f := range secretForms() {
		if strings.Contains(msg, f) {
			t.Errorf("redacted message still has a secret form: %q", msg)
		}
	}
	if msg != "upstream said: REDACTED; REDACTED; REDACTED; REDACTED; Basic REDACTED" {
		t.Errorf("message %q", msg)
	}
}
