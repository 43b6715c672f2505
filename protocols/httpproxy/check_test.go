package httpproxy

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credproxy/credproxy/config"
)

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if err := InitCA(other, io.Discard); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "roots.txt")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	leaf := filepath.Join(dir, "leaf.pem")
	pki := newTestPKI(t)
	if err := os.WriteFile(leaf, pemCert(pki.serverCert(t, "x.test").Certificate[0]), 0o644); err != nil {
		t.Fatal(err)
	}
	good := config.HTTP{
		Listen: "127.0.0.1:0", Default: "deny",
		CA:     config.HTTPCA{CertFile: filepath.Join(dir, CACertFile), KeyFile: filepath.Join(dir, CAKeyFile)},
		Routes: []config.HTTPRoute{headerRoute("api.example.com")},
	}
	hopByHop := headerRoute("b.example.com")
	hopByHop.Inject.Header = &config.NameValue{Name: "Proxy-Authorization", Value: "{{ .token }}"}
	connection := headerRoute("c.example.com")
	connection.Inject.Header = &config.NameValue{Name: "connection", Value: "{{ .token }}"}

	tests := []struct {
		name string
		edit func(c *config.HTTP)
		want []string // each the start of its own problem, in order
	}{
		{name: "valid", edit: func(*config.HTTP) {}},
		{name: "every route, the CA and the roots", edit: func(c *config.HTTP) {
			c.Routes = append(c.Routes, hopByHop, connection)
			c.CA.KeyFile = filepath.Join(other, CAKeyFile)
			c.UpstreamCAFile = notPEM
		}, want: []string{
			`http.routes[1].inject: header: "Proxy-Authorization" is a hop-by-hop header`,
			`http.routes[2].inject: header: "connection" is a hop-by-hop header`,
			"http.ca.key_file: does not match the certificate in http.ca.cert_file",
			"http.upstream_ca_file: http.upstream_ca_file " + notPEM + ": no PEM certificate",
		}},
		{name: "CA is a leaf", edit: func(c *config.HTTP) { c.CA.CertFile = leaf },
			want: []string{"http.ca.cert_file: the certificate is not a CA"}},
		{name: "CA missing", edit: func(c *config.HTTP) { c.CA.CertFile = filepath.Join(dir, "gone.pem") },
			want: []string{"http.ca.cert_file: open " + filepath.Join(dir, "gone.pem") + ": no such file or directory"}},
		{name: "CA key is not a key", edit: func(c *config.HTTP) { c.CA.KeyFile = notPEM },
			want: []string{"http.ca.key_file: no PEM private key block"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			c.Routes = append([]config.HTTPRoute(nil), good.Routes...)
			tt.edit(&c)
			errs := check(c)
			if len(errs) != len(tt.want) {
				t.Fatalf("Check = %q, want %d problems %q", errs, len(tt.want), tt.want)
			}
			for i, err := range errs {
				if !strings.HasPrefix(err.Error(), tt.want[i]) {
					t.Errorf("problem %d = %q, want it to start with %q", i, err, tt.want[i])
				}
			}
		})
	}
}
