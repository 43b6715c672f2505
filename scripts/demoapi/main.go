// Command demoapi is the HTTPS API that `make demo` puts behind credproxy.
// GET /v1/whoami answers 200 only to a request carrying
// "Authorization: Bearer TOKEN" with the token in -token-file, and 401 to
// anything else.
//
// It makes a throwaway CA and a certificate for localhost, 127.0.0.1 and
// ::1 signed by it, writes the CA certificate to -ca-out (for credproxy's
// http.upstream_ca_file, or curl --cacert), then listens. Each request is
// one line on stdout saying whether a bearer token came and whether it was
// the right one; the token itself is never printed.
//
//	demoapi -listen 127.0.0.1:8443 -token-file api.token -ca-out api-ca.pem
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8443", "address to listen on")
	tokenFile := flag.String("token-file", "", "file holding the one bearer token accepted (required)")
	caOut := flag.String("ca-out", "", "where to write the CA certificate that signed the server's (required)")
	flag.Parse()
	if *tokenFile == "" || *caOut == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: demoapi -listen ADDR -token-file FILE -ca-out FILE")
		os.Exit(2)
	}
	log.SetFlags(0)
	if err := run(*listen, *tokenFile, *caOut); err != nil {
		log.Fatalf("demoapi: %v", err)
	}
}

func run(listen, tokenFile, caOut string) error {
	b, err := os.ReadFile(tokenFile)
	if err != nil {
		return fmt.Errorf("read the token: %w", err)
	}
	token := strings.TrimRight(string(b), "\r\n")
	if token == "" {
		return fmt.Errorf("%s is empty", tokenFile)
	}
	caPEM, cert, err := newCertificate(time.Now())
	if err != nil {
		return fmt.Errorf("make the certificate: %w", err)
	}
	if err := os.WriteFile(caOut, caPEM, 0o644); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           newHandler(token, os.Stdout),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0), // handshakes a client aborts are no news here
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// newHandler serves /v1/whoami to requests bearing token, and logs one
// line per request to w.
func newHandler(token string, w io.Writer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/whoami", func(rw http.ResponseWriter, r *http.Request) {
		got, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		ok := hasBearer && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
		var saw string
		switch {
		case r.Header.Get("Authorization") == "":
			saw = "no Authorization header"
		case ok:
			saw = "Authorization: Bearer <the right token>"
		default:
			saw = "an Authorization header with the wrong token"
		}
		rw.Header().Set("Content-Type", "application/json")
		status := http.StatusOK
		body := `{"authenticated": true, "subject": "demo-app"}`
		if !ok {
			status = http.StatusUnauthorized
			body = `{"error": "a valid bearer token is required"}`
			rw.Header().Set("WWW-Authenticate", `Bearer realm="demo"`)
		}
		fmt.Fprintf(w, "demo API: %s %s with %s -> %d\n", r.Method, r.URL.Path, saw, status)
		rw.WriteHeader(status)
		fmt.Fprintln(rw, body)
	})
	return mux
}

// newCertificate makes a CA valid for a day and a server certificate for
// localhost, 127.0.0.1 and ::1 that it signed. It returns the CA in PEM.
func newCertificate(now time.Time) (caPEM []byte, cert tls.Certificate, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, cert, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "credproxy demo API CA"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, cert, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, cert, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, cert, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, cert, err
	}
	cert = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), cert, nil
}
