package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaults(t *testing.T) {
	dir := fixture(t)
	cfg, lines := parseLines(t, dir, `
secrets:
  app: {static: {username: app, password_file: app.pw}}
  dyn: {vault: {path: database/creds/app}}
vault:
  address: https://vault.internal:8200
  auth: {method: kubernetes, role: app}
postgres:
  - {name: a, listen: "127.0.0.1:6432", upstream: db.internal, credentials: app, client_tls: {}}
  - {name: b, listen: "127.0.0.1:6433", upstream: "::1", credentials: app}
  - {name: c, listen: "127.0.0.1:6434", upstream: "[fe80::1]", credentials: app}
  - {name: d, listen: "127.0.0.1:6435", upstream: "db:6000", credentials: app}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - {host: api.example.com, credentials: app, inject: {basic: {username: u}}}
`)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	durations := []struct {
		name      string
		got, want time.Duration
	}{
		{"shutdown_grace", cfg.ShutdownGrace.D(), 30 * time.Second},
		{"postgres[0].startup_timeout", cfg.Postgres[0].StartupTimeout.D(), 10 * time.Second},
		{"postgres[0].connect_timeout", cfg.Postgres[0].ConnectTimeout.D(), 10 * time.Second},
	}
	for _, d := range durations {
		if d.got != d.want {
			t.Errorf("%s = %v, want %v", d.name, d.got, d.want)
		}
	}
	strs := []struct{ name, got, want string }{
		{"postgres[0].tls.mode", cfg.Postgres[0].TLS.Mode, "verify-full"},
		{"postgres[0].upstream", cfg.Postgres[0].Upstream, "db.internal:5432"},
		{"postgres[1].upstream", cfg.Postgres[1].Upstream, "[::1]:5432"},
		{"postgres[2].upstream", cfg.Postgres[2].Upstream, "[fe80::1]:5432"},
		{"postgres[3].upstream", cfg.Postgres[3].Upstream, "db:6000"},
		{"vault.auth.mount", cfg.Vault.Auth.Mount, "kubernetes"},
		{"vault.auth.jwt_file", cfg.Vault.Auth.JWTFile, "/var/run/secrets/kubernetes.io/serviceaccount/token"},
		{"http.default", cfg.HTTP.Default, "deny"},
		{"http.routes[0].upstream", cfg.HTTP.Routes[0].Upstream, "https"},
	}
	for _, s := range strs {
		if s.got != s.want {
			t.Errorf("%s = %q, want %q", s.name, s.got, s.want)
		}
	}
	if r := cfg.Vault.RevokeOnShutdown; r == nil || !*r {
		t.Errorf("vault.revoke_on_shutdown = %v, want true", r)
	}
	if cfg.Postgres[0].ClientTLS != nil {
		t.Errorf("postgres[0].client_tls = %+v, want nil for an empty block", cfg.Postgres[0].ClientTLS)
	}
	if cfg.Audit.Path != "" {
		t.Errorf("audit.path = %q, want empty (no audit)", cfg.Audit.Path)
	}
}

func TestDefaultsKeepExplicitValues(t *testing.T) {
	dir := fixture(t)
	cfg, lines := parseLines(t, dir, `
shutdown_grace: 0s
secrets:
  app: {static: {username: app, password_file: app.pw}}
vault:
  address: http://127.0.0.1:8200
  revoke_on_shutdown: false
  auth: {method: approle, role_id_file: role-id, secret_id_file: secret-id, mount: ci-approle}
postgres:
  - name: a
    listen: 127.0.0.1:6432
    upstream: db.internal
    credentials: app
    startup_timeout: 1m30s
    connect_timeout: 2s
    tls: {mode: require}
`)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	if got := cfg.ShutdownGrace.D(); got != 0 {
		t.Errorf("shutdown_grace = %v, want 0 as written", got)
	}
	if got := cfg.Postgres[0].StartupTimeout.D(); got != 90*time.Second {
		t.Errorf("startup_timeout = %v, want 1m30s", got)
	}
	if got := cfg.Postgres[0].ConnectTimeout.D(); got != 2*time.Second {
		t.Errorf("connect_timeout = %v, want 2s", got)
	}
	if got := cfg.Postgres[0].TLS.Mode; got != "require" {
		t.Errorf("tls.mode = %q, want require", got)
	}
	if r := cfg.Vault.RevokeOnShutdown; r == nil || *r {
		t.Errorf("vault.revoke_on_shutdown = %v, want false", r)
	}
	if got := cfg.Vault.Auth.Mount; got != "ci-approle" {
		t.Errorf("vault.auth.mount = %q, want ci-approle", got)
	}
}

func TestDefaultMounts(t *testing.T) {
	for _, tt := range []struct{ auth, want string }{
		{"{method: approle, role_id_file: role-id, secret_id_file: secret-id}", "approle"},
		{"{method: kubernetes, role: r}", "kubernetes"},
		{"{method: jwt, role: r, jwt_file: jwt}", "jwt"},
		{"{method: token, token_file: vault-token}", ""},
	} {
		t.Run(tt.want, func(t *testing.T) {
			dir := fixture(t)
			cfg, lines := parseLines(t, dir, appSecret+pg()+"vault: {address: \"http://v\", auth: "+tt.auth+"}\n")
			if len(lines) > 0 {
				t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
			}
			if got := cfg.Vault.Auth.Mount; got != tt.want {
				t.Errorf("vault.auth.mount = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRelativePathsResolved(t *testing.T) {
	dir := fixture(t)
	cfg, lines := parseLines(t, dir, `
audit: {path: adir/audit.jsonl}
secrets:
  app: {static: {username: app, password_file: app.pw, other_file: /dev/null}}
vault:
  address: https://vault.internal:8200
  ca_file: vault-ca.pem
  auth: {method: approle, role_id_file: role-id, secret_id_file: ./secret-id, token_file: vault-token, jwt_file: jwt}
postgres:
  - name: a
    listen: 127.0.0.1:6432
    upstream: db.internal
    credentials: app
    tls: {ca_file: db-ca.pem, cert_file: client.pem, key_file: client-key.pem}
    client_tls: {cert_file: client.pem, key_file: client-key.pem}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  upstream_ca_file: db-ca.pem
`)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	in := func(name string) string { return filepath.Join(dir, name) }
	pg := cfg.Postgres[0]
	for _, tt := range []struct{ name, got, want string }{
		{"audit.path", cfg.Audit.Path, in("adir/audit.jsonl")},
		{"secrets.app.static.password_file", cfg.Secrets["app"].Static["password_file"], in("app.pw")},
		{"secrets.app.static.other_file", cfg.Secrets["app"].Static["other_file"], "/dev/null"},
		{"secrets.app.static.username", cfg.Secrets["app"].Static["username"], "app"},
		{"vault.ca_file", cfg.Vault.CAFile, in("vault-ca.pem")},
		{"vault.auth.token_file", cfg.Vault.Auth.TokenFile, in("vault-token")},
		{"vault.auth.role_id_file", cfg.Vault.Auth.RoleIDFile, in("role-id")},
		{"vault.auth.secret_id_file", cfg.Vault.Auth.SecretIDFile, in("secret-id")},
		{"vault.auth.jwt_file", cfg.Vault.Auth.JWTFile, in("jwt")},
		{"postgres[0].tls.ca_file", pg.TLS.CAFile, in("db-ca.pem")},
		{"postgres[0].tls.cert_file", pg.TLS.CertFile, in("client.pem")},
		{"postgres[0].tls.key_file", pg.TLS.KeyFile, in("client-key.pem")},
		{"postgres[0].client_tls.cert_file", pg.ClientTLS.CertFile, in("client.pem")},
		{"postgres[0].client_tls.key_file", pg.ClientTLS.KeyFile, in("client-key.pem")},
		{"http.ca.cert_file", cfg.HTTP.CA.CertFile, in("ca.pem")},
		{"http.ca.key_file", cfg.HTTP.CA.KeyFile, in("ca-key.pem")},
		{"http.upstream_ca_file", cfg.HTTP.UpstreamCAFile, in("db-ca.pem")},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %q, want %q", tt.name, tt.got, tt.want)
		}
	}
}

func TestAuditStdoutNotResolved(t *testing.T) {
	cfg, lines := parseLines(t, fixture(t), "audit: {path: \"-\"}\n"+minimalPostgres)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	if cfg.Audit.Path != "-" {
		t.Errorf("audit.path = %q, want -", cfg.Audit.Path)
	}
}

func TestLoadResolvesAgainstConfigDirectory(t *testing.T) {
	dir := fixture(t)
	if err := os.WriteFile(filepath.Join(dir, "credproxy.yaml"), []byte(minimalPostgres), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir()) // app.pw is not here: only the config's directory has it
	for _, path := range []string{filepath.Join(dir, "credproxy.yaml"), mustRel(t, dir, "credproxy.yaml")} {
		t.Run(path, func(t *testing.T) {
			cfg, err := Load(path)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if got, want := cfg.Secrets["app"].Static["password_file"], filepath.Join(dir, "app.pw"); got != want {
				t.Errorf("password_file = %q, want %q", got, want)
			}
		})
	}
}

// mustRel returns dir/name relative to the working directory.
func mustRel(t *testing.T, dir, name string) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(wd, filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

func TestParseWithoutBaseDir(t *testing.T) {
	dir := fixture(t)
	t.Chdir(dir)
	cfg, lines := parseLines(t, "", minimalPostgres)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	if got := cfg.Secrets["app"].Static["password_file"]; got != "app.pw" {
		t.Errorf("password_file = %q, want app.pw left relative", got)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load error = %v, want one wrapping fs.ErrNotExist", err)
	}
	if lines := Lines(err); len(lines) != 1 || !strings.HasPrefix(lines[0], "read config: ") {
		t.Errorf("Lines = %q, want one line starting with \"read config: \"", lines)
	}
}

func TestErrors(t *testing.T) {
	_, err := Parse([]byte("postgres: [{name: \"a b\"}]\nbogus: 1\n"), t.TempDir())
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error %T is not an Errors", err)
	}
	lines := errs.Lines()
	if got, want := err.Error(), strings.Join(lines, "\n"); got != want {
		t.Errorf("Error() = %q, want the lines joined by newlines %q", got, want)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Path != "bogus" || fe.Msg != "unknown key" {
		t.Errorf("first FieldError = %+v, want bogus: unknown key", fe)
	}
	for _, l := range lines {
		if strings.Contains(l, "\n") {
			t.Errorf("line %q contains a newline", l)
		}
	}
	if Lines(nil) != nil {
		t.Errorf("Lines(nil) = %q, want nil", Lines(nil))
	}
	if got := Lines(errors.New("plain")); len(got) != 1 || got[0] != "plain" {
		t.Errorf("Lines(plain) = %q", got)
	}
}

func TestTLSServerName(t *testing.T) {
	for _, tt := range []struct {
		name string
		p    Postgres
		want string
	}{
		{"explicit", Postgres{Upstream: "10.0.0.5:5432", TLS: PostgresTLS{ServerName: "db.internal"}}, "db.internal"},
		{"upstream host", Postgres{Upstream: "db.internal:5432"}, "db.internal"},
		{"ipv6 upstream", Postgres{Upstream: "[::1]:5432"}, "::1"},
		{"no port", Postgres{Upstream: "db"}, "db"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.p.TLSServerName(); got != tt.want {
				t.Errorf("TLSServerName() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDurationYAML(t *testing.T) {
	d := Duration(90 * time.Second)
	v, err := d.MarshalYAML()
	if err != nil || v != "1m30s" {
		t.Errorf("MarshalYAML = %v, %v; want 1m30s", v, err)
	}
}

// rotation.migrate_before as INTERFACE.md writes it ("") means the
// default; a Go duration sets it; a negative one is refused.
func TestRotationMigrateBefore(t *testing.T) {
	for _, tc := range []struct {
		value   string
		want    time.Duration
		problem string
	}{
		{`""`, 0, ""},
		{"90s", 90 * time.Second, ""},
		{"-1s", 0, "postgres[0].rotation.migrate_before: must not be negative"},
	} {
		t.Run(tc.value, func(t *testing.T) {
			dir := fixture(t)
			cfg, lines := parseLines(t, dir, `
secrets:
  app: {static: {username: app, password_file: app.pw}}
postgres:
  - name: a
    listen: "127.0.0.1:6432"
    upstream: db.internal
    credentials: app
    rotation: {migrate_before: `+tc.value+`}
`)
			if got := strings.Join(lines, "\n"); got != tc.problem {
				t.Fatalf("problems %q, want %q", got, tc.problem)
			}
			if tc.problem == "" && cfg.Postgres[0].Rotation.MigrateBefore.D() != tc.want {
				t.Errorf("migrate_before = %v, want %v", cfg.Postgres[0].Rotation.MigrateBefore, tc.want)
			}
		})
	}
}
