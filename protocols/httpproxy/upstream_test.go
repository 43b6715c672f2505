package httpproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// timeoutErr is a net.Error that timed out, with a message that says
// nothing of it.
type timeoutErr struct{}

func (timeoutErr) Error() string   { return "the wait was over" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

// The reason and the message's phrase follow the error's type, whatever
// its text says: each case's message is worded to mislead a decision
// made on text ("tls: " where there is no TLS, none where there is).
func TestClassifyUpstreamOnTypes(t *testing.T) {
	reworded := errors.New("something went wrong")
	tests := []struct {
		name         string
		err          error
		reason, what string
	}{
		{"handshake failure, any wording", &TLSHandshakeError{Addr: "a:443", Err: reworded}, reasonUpstreamTLS, "TLS handshake failed"},
		{"handshake failure, wrapped", fmt.Errorf("round trip: %w", &TLSHandshakeError{Err: io.EOF}), reasonUpstreamTLS, "TLS handshake failed"},
		{"not TLS on the wire", tls.RecordHeaderError{Msg: "odd bytes"}, reasonUpstreamTLS, "TLS handshake failed"},
		{"alert", fmt.Errorf("x: %w", tls.AlertError(40)), reasonUpstreamTLS, "TLS handshake failed"},
		{"alert after the handshake", &net.OpError{Op: "remote error", Err: reworded}, reasonUpstreamTLS, "TLS handshake failed"},
		{"certificate", &tls.CertificateVerificationError{Err: reworded}, reasonUpstreamTLS, "TLS verification failed"},
		{"certificate inside a handshake failure", &TLSHandshakeError{Err: &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}}, reasonUpstreamTLS, "TLS verification failed"},
		{"x509 host name", x509.HostnameError{Host: "a"}, reasonUpstreamTLS, "TLS verification failed"},
		{"x509 invalid", x509.CertificateInvalidError{Reason: x509.Expired}, reasonUpstreamTLS, "TLS verification failed"},
		{"dial, worded like TLS", &DialError{Addr: "a:443", Err: errors.New("tls: connection refused")}, reasonUpstreamUnreachable, "unreachable"},
		{"dial by the net package", &net.OpError{Op: "dial", Err: reworded}, reasonUpstreamUnreachable, "unreachable"},
		{"text that mentions tls: only", errors.New("tls: bad record MAC"), reasonUpstreamError, "failed"},
		{"text that mentions a timeout only", errors.New("i/o timeout"), reasonUpstreamError, "failed"},
		{"deadline", fmt.Errorf("dial: %w", context.DeadlineExceeded), reasonUpstreamTimeout, "timed out"},
		{"net timeout", &DialError{Err: timeoutErr{}}, reasonUpstreamTimeout, "timed out"},
		{"cancelled", fmt.Errorf("read: %w", context.Canceled), reasonClientGone, "request cancelled"},
		{"anything else", reworded, reasonUpstreamError, "failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reason, what := classifyUpstream(tt.err)
			if reason != tt.reason || what != tt.what {
				t.Errorf("classifyUpstream(%q) = %q, %q; want %q, %q", tt.err, reason, what, tt.reason, tt.what)
			}
		})
	}
}

// startRawUpstream accepts connections and hands each to serve.
func startRawUpstream(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// Upstream TLS failures other than an untrusted certificate: the app
// gets a 502 naming a TLS handshake failure, and the audit record says
// "upstream TLS failed", whatever crypto/tls's message.
func TestUpstreamTLSFailures(t *testing.T) {
	pki := newTestPKI(t)
	plain := startRawUpstream(t, func(c net.Conn) {
		_, _ = io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
	})
	hangUp := startRawUpstream(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 1)) // the ClientHello's first byte, then nothing
	})
	// A server that wants a client certificate: with TLS 1.3 the client's
	// handshake completes first, and the alert comes with the response.
	needsCert := startRawUpstream(t, func(c net.Conn) {
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{pki.serverCert(t, "alert.test")},
			ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13})
		_ = tc.Handshake()
		_, _ = io.Copy(io.Discard, tc)
	})
	tp := startProxy(t, proxySetup{
		upCA:   pki,
		routes: []config.HTTPRoute{headerRoute("plain.test"), headerRoute("hangup.test"), headerRoute("alert.test")},
		dial:   map[string]string{"plain.test": plain, "hangup.test": hangUp, "alert.test": needsCert},
	})
	c := tp.client(t)
	for _, host := range []string{"plain.test", "hangup.test", "alert.test"} {
		t.Run(host, func(t *testing.T) {
			status, b := tp.get(t, c, "https://"+host+"/")
			if status != http.StatusBadGateway || !strings.Contains(b, "credproxy: upstream "+host+":443 TLS handshake failed") {
				t.Errorf("status %d body %q, want 502 naming a TLS handshake failure", status, b)
			}
			tp.audit.find(t, "denied "+host, func(r audit.Record) bool {
				return r.Event == audit.EventDenied && r.Host == host && r.Reason == reasonUpstreamTLS
			})
		})
	}
}

// A new upstream connection to a host seen before resumes its TLS session.
func TestUpstreamTLSSessionResumed(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	var (
		mu      sync.Mutex
		resumed []bool
	)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		resumed = append(resumed, r.TLS.DidResume)
		mu.Unlock()
		w.Header().Set("Connection", "close") // the next request needs a new connection
		_, _ = io.WriteString(w, "ok")
	})
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": up.addr()}})
	c := tp.client(t)
	for range 3 {
		if status, b := tp.get(t, c, "https://api.test/"); status != http.StatusOK {
			t.Fatalf("status %d body %q", status, b)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(resumed) != 3 || resumed[0] || !resumed[1] || !resumed[2] {
		t.Errorf("upstream connections resumed a session: %v, want [false true true]", resumed)
	}
}

// An HTTPS route with max_upstream_connections dials its upstream TLS
// connections through its bound: an open connection holds a place.
func TestMaxUpstreamConnectionsHTTPSHoldsPlace(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	route := headerRoute("api.test")
	route.MaxUpstreamConnections = 2
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{route}, dial: map[string]string{"api.test": up.addr()}})
	if status, b := tp.get(t, tp.client(t), "https://api.test/"); status != http.StatusOK {
		t.Fatalf("status %d body %q", status, b)
	}
	r := tp.p.routes.routes[0]
	if n := len(r.upstream); n != 1 {
		t.Errorf("the route's bound holds %d places after one request, want 1 (its pooled connection)", n)
	}
}

// rotatingSource hands out a new token on every fetch.
type rotatingSource struct {
	mu sync.Mutex
	n  int
}

func (s *rotatingSource) Fetch(context.Context) (*credentials.Credential, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	return &credentials.Credential{Fields: map[string]credentials.Secret{
		"token": credentials.NewSecret(fmt.Sprintf("rotating-token-%d-0123456789abcdef", s.n)),
	}}, nil
}

// A route renders its injection once per credential: a credential
// fetched anew is injected, and scrubbed from what echoes it, from the
// first request that uses it.
func TestInjectionFollowsANewCredential(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Echo", r.Header.Get("Authorization"))
		_, _ = io.WriteString(w, "ok")
	})
	store := credentials.NewStore(map[string]credentials.Source{"tok": &rotatingSource{}}, credentials.Options{})
	t.Cleanup(func() { store.Close(context.Background()) })
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")},
		dial: map[string]string{"api.test": up.addr()}, creds: store})
	c := tp.client(t)
	for i := 1; i <= 3; i++ {
		resp, err := c.Get("https://api.test/")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		want := fmt.Sprintf("Bearer rotating-token-%d-0123456789abcdef", i)
		if got := up.requests()[i-1].Header.Get("Authorization"); got != want {
			t.Errorf("request %d: upstream got Authorization %q, want %q", i, got, want)
		}
		if echo := resp.Header.Get("X-Echo"); echo != "REDACTED" {
			t.Errorf("request %d: the app read X-Echo %q, want REDACTED", i, echo)
		}
		// The next request fetches a new credential.
		h, err := store.Acquire(context.Background(), "tok")
		if err != nil {
			t.Fatal(err)
		}
		h.Invalidate()
		h.Release()
	}
}
