package main

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestHandler(t *testing.T) {
	const token = "s3cr3t-token-value"
	tests := []struct {
		name       string
		auth       string
		wantStatus int
		wantLog    string
	}{
		{"right token", "Bearer " + token, http.StatusOK, "Authorization: Bearer <the right token> -> 200"},
		{"no header", "", http.StatusUnauthorized, "no Authorization header -> 401"},
		{"wrong token", "Bearer nope", http.StatusUnauthorized, "the wrong token -> 401"},
		{"not bearer", "Basic " + token, http.StatusUnauthorized, "the wrong token -> 401"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log strings.Builder
			h := newHandler(token, &log)
			req := httptest.NewRequest(http.MethodGet, "/v1/whoami", nil)
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tt.wantStatus {
				t.Errorf("status = %d, want %d", rec.Code, tt.wantStatus)
			}
			if !strings.Contains(log.String(), tt.wantLog) {
				t.Errorf("log = %q, want it to contain %q", log.String(), tt.wantLog)
			}
			if strings.Contains(log.String(), token) || strings.Contains(rec.Body.String(), token) {
				t.Errorf("the token leaked: log %q, body %q", log.String(), rec.Body.String())
			}
		})
	}
}

func TestCertificate(t *testing.T) {
	now := time.Now()
	caPEM, cert, err := newCertificate(now)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("the CA PEM does not parse")
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
		opts := x509.VerifyOptions{DNSName: name, Roots: roots, CurrentTime: now}
		if _, err := leaf.Verify(opts); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}

	// A real handshake: the key matches the certificate.
	srv := httptest.NewUnstartedServer(newHandler("t", io.Discard))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "localhost"}}}
	resp, err := client.Get(srv.URL + "/v1/whoami")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("status = %d, want 401", resp.StatusCode)
	}
}
