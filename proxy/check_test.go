package proxy_test

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/proxy"
)

// checkFixture is a config that Check accepts, with its files in dir:
// a CA (ca.pem, ca-key.pem) and a second key pair (other/), a static
// secret from a file, a postgres service with client TLS, a Vault block,
// an HTTP proxy and an audit path that does not exist yet. Its upstream
// and Vault are listeners that count connections: Check must make none.
type checkFixture struct {
	dir     string
	cfg     *config.Config
	dials   *atomic.Int32
	vaultRq *atomic.Int32
}

func newCheckFixture(t *testing.T) *checkFixture {
	t.Helper()
	f := &checkFixture{dir: t.TempDir(), dials: new(atomic.Int32), vaultRq: new(atomic.Int32)}
	for _, d := range []string{f.dir, f.path("other")} {
		if err := httpproxy.InitCA(d, io.Discard); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(f.path("app.pw"), []byte("pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			f.dials.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { up.Close(); <-done })
	vault := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.vaultRq.Add(1)
		http.Error(w, "no", http.StatusForbidden)
	}))
	t.Cleanup(vault.Close)
	if err := os.WriteFile(f.path("vault-token"), []byte("t\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	f.cfg = &config.Config{
		ShutdownGrace: config.Duration(time.Second),
		Audit:         config.Audit{Path: f.path("audit.jsonl")},
		Secrets: map[string]config.Secret{
			"app": {Static: map[string]string{"username": "u", "password_file": f.path("app.pw")}},
			"dyn": {Vault: &config.VaultSecret{Path: "database/creds/app", RefreshInterval: config.Duration(time.Minute)}},
		},
		Vault: &config.Vault{Address: vault.URL, RequestTimeout: config.Duration(time.Second),
			Auth: config.VaultAuth{Method: "token", TokenFile: f.path("vault-token")}},
		Postgres: []config.Postgres{{
			Name: "db", Listen: "127.0.0.1:0", Upstream: up.Addr().String(), Credentials: "dyn",
			TLS:       config.PostgresTLS{Mode: "verify-full", CAFile: f.path("ca.pem")},
			ClientTLS: &config.ClientTLS{CertFile: f.path("ca.pem"), KeyFile: f.path("ca-key.pem")},
		}},
		HTTP: &config.HTTP{
			Listen: "127.0.0.1:0", Default: "deny",
			CA: config.HTTPCA{CertFile: f.path("ca.pem"), KeyFile: f.path("ca-key.pem")},
			Routes: []config.HTTPRoute{{Host: "api.example.com", Credentials: "app", Upstream: "https",
				Inject: config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .password }}"}}}},
		},
	}
	return f
}

func (f *checkFixture) path(name string) string { return filepath.Join(f.dir, name) }

func TestCheck(t *testing.T) {
	tests := []struct {
		name string
		edit func(f *checkFixture)
		want []string // exact lines; {dir} is the fixture
	}{
		{name: "valid", edit: func(*checkFixture) {}},
		{name: "every part at once", edit: func(f *checkFixture) {
			f.cfg.Vault.CAFile = f.path("app.pw")
			f.cfg.Secrets["app"].Static["password_file"] = f.path("gone.pw")
			f.cfg.Secrets["more"] = config.Secret{Static: map[string]string{"token_file": f.path("adir")}}
			if err := os.Mkdir(f.path("adir"), 0o700); err != nil {
				t.Fatal(err)
			}
			f.cfg.Audit.Path = f.path("nodir/audit.jsonl")
			f.cfg.Postgres[0].ClientTLS.KeyFile = f.path("other/ca-key.pem")
			f.cfg.Postgres = append(f.cfg.Postgres, config.Postgres{Name: "db2", Listen: "127.0.0.1:0", Upstream: "db:5432",
				Credentials: "app", TLS: config.PostgresTLS{Mode: "verify-full", CAFile: f.path("app.pw")}})
			f.cfg.HTTP.CA.KeyFile = f.path("other/ca-key.pem")
			f.cfg.HTTP.Routes[0].Inject.Header.Name = "Proxy-Authorization"
		}, want: []string{
			"vault: vault.ca_file: Error loading CA File: Couldn't parse PEM in: {dir}/app.pw",
			"secrets.app.static: read password_file: open {dir}/gone.pw: no such file or directory",
			"secrets.more.static: read token_file: read {dir}/adir: is a directory",
			"audit.path: cannot create audit.jsonl in {dir}/nodir: no such file or directory",
			"postgres[0]: postgres db: load client_tls certificate: tls: private key does not match public key",
			"postgres[1]: postgres db2: tls.ca_file {dir}/app.pw: no PEM certificates",
			`http.routes[0].inject: header: "Proxy-Authorization" is a hop-by-hop header and would not reach the upstream`,
			"http.ca.key_file: does not match the certificate in http.ca.cert_file",
		}},
		{name: "upstream client certificate", edit: func(f *checkFixture) {
			f.cfg.Postgres[0].TLS.CertFile = f.path("ca.pem")
			f.cfg.Postgres[0].TLS.KeyFile = f.path("app.pw")
		}, want: []string{"postgres[0]: postgres db: load tls client certificate: tls: failed to find any PEM data in key input"}},
		{name: "CA is no CA", edit: func(f *checkFixture) {
			f.cfg.HTTP.CA.CertFile = f.path("app.pw")
		}, want: []string{"http.ca.cert_file: no PEM CERTIFICATE block"}},
		// New refuses what the steps before it do not check: Check still fails.
		{name: "only New refuses", edit: func(f *checkFixture) { f.cfg.HTTP.Default = "allow" },
			want: []string{`http.default: "allow" is not deny or tunnel`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newCheckFixture(t)
			tt.edit(f)
			got := config.Lines(proxy.Check(f.cfg, testOptions()))
			want := make([]string, len(tt.want))
			for i, w := range tt.want {
				want[i] = strings.ReplaceAll(w, "{dir}", f.dir)
			}
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("Check:\n\t%s\nwant:\n\t%s", strings.Join(got, "\n\t"), strings.Join(want, "\n\t"))
			}
			if n := f.dials.Load(); n != 0 {
				t.Errorf("Check dialed the upstream %d times", n)
			}
			if n := f.vaultRq.Load(); n != 0 {
				t.Errorf("Check sent Vault %d requests", n)
			}
			if _, err := os.Stat(f.path("audit.jsonl")); !os.IsNotExist(err) {
				t.Errorf("Check created the audit log (stat: %v)", err)
			}
		})
	}
}

func TestCheckAuditExisting(t *testing.T) {
	f := newCheckFixture(t)
	const content = "{\"event\":\"session_start\"}\n"
	if err := os.WriteFile(f.cfg.Audit.Path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := proxy.Check(f.cfg, testOptions()); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if b, err := os.ReadFile(f.cfg.Audit.Path); err != nil || string(b) != content {
		t.Errorf("audit log after Check = %q, %v; want it untouched", b, err)
	}
}

func TestLogWarnings(t *testing.T) {
	dir := t.TempDir()
	if err := httpproxy.InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	src := `
secrets:
  tok: {static: {token: t}}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - {host: 10.0.0.9, credentials: tok, upstream: http, inject: {header: {name: X-Token, value: "{{ .token }}"}}}
`
	cfg, err := config.Parse([]byte(src), dir)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	proxy.LogWarnings(zap.New(core), "/etc/credproxy.yaml", cfg)
	var got bytes.Buffer
	for _, e := range logs.All() {
		got.WriteString(e.Level.String() + " " + e.Message)
		for _, k := range []string{"config", "key", "warning"} {
			got.WriteString(" " + k + "=" + e.ContextMap()[k].(string))
		}
		got.WriteString("\n")
	}
	want := `warn config warning config=/etc/credproxy.yaml key=http.routes[0].host warning="10.0.0.9" is an IP address: the credential goes to whatever host holds that address; prefer a DNS name
warn config warning config=/etc/credproxy.yaml key=http.routes[0].upstream warning=the header X-Token is sent upstream in cleartext: anyone on the network path can read and replay it; use https unless the path is encrypted by other means
`
	if got.String() != want {
		t.Errorf("logged:\n%s\nwant:\n%s", got.String(), want)
	}
}

// --watch watches the config, the files secrets and Vault name, and what
// each service was built from, which the protocols say.
func TestReferencedFiles(t *testing.T) {
	f := newCheckFixture(t)
	f.cfg.Postgres[0].TLS.CertFile, f.cfg.Postgres[0].TLS.KeyFile = f.path("other/ca.pem"), f.path("other/ca-key.pem")
	f.cfg.HTTP.UpstreamCAFile = f.path("other/ca.pem")
	noAudit := *f.cfg
	noAudit.Audit.Path = ""
	srv, err := proxy.New(&noAudit, zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	got := srv.ReferencedFiles(f.path("credproxy.yaml"))
	want := []string{f.path("app.pw"), f.path("ca-key.pem"), f.path("ca.pem"), f.path("credproxy.yaml"),
		f.path("other/ca-key.pem"), f.path("other/ca.pem"), f.path("vault-token")}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("ReferencedFiles:\n\t%s\nwant:\n\t%s", strings.Join(got, "\n\t"), strings.Join(want, "\n\t"))
	}
}
