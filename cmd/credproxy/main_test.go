package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"

	"github.com/credproxy/credproxy/protocols/httpproxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cli runs credproxy with args and returns its exit code, stdout and stderr.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// workdir is a directory with what configs name: a CA (ca.pem, ca-key.pem,
// mode 0600), another CA's key (other/ca-key.pem) and a password file.
func workdir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Join(dir, "other")} {
		if err := httpproxy.InitCA(d, io.Discard); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "app.pw"), []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// writeConfig writes credproxy.yaml into dir and returns its path.
func writeConfig(t *testing.T, dir, src string) string {
	t.Helper()
	path := filepath.Join(dir, "credproxy.yaml")
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

const (
	secrets = `
secrets:
  app: {static: {username: app, password_file: app.pw}}
`
	pgService = `
postgres:
  - name: appdb
    listen: 127.0.0.1:6432
    upstream: db.internal:5432
    credentials: app
`
	httpProxy = `
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - host: api.example.com
      credentials: app
      inject: {header: {name: Authorization, value: "Bearer {{ .password }}"}}
`
)

func TestValidateCommand(t *testing.T) {
	tests := []struct {
		name       string
		src        string
		setup      func(t *testing.T, dir string)
		code       int
		wantStdout bool     // "<config>: valid"
		wantStderr []string // exact lines, {dir} the work directory
	}{
		{name: "valid", src: secrets + pgService + httpProxy, code: 0, wantStdout: true},
		{name: "valid with warnings", code: 0, wantStdout: true,
			src: secrets + strings.Replace(httpProxy, "host: api.example.com", "host: 10.0.0.9", 1) +
				"    - {host: api.internal, credentials: app, upstream: http, inject: {query: {name: key, value: '{{ .password }}'}}}\n",
			wantStderr: []string{
				`warning: http.routes[0].host: "10.0.0.9" is an IP address: the credential goes to whatever host holds that address; prefer a DNS name`,
				"warning: http.routes[1].upstream: the query parameter key is sent upstream in cleartext: anyone on the network path " +
					"can read and replay it; use https unless the path is encrypted by other means",
			}},
		{name: "refused by the config checks", code: 1,
			src: secrets + strings.NewReplacer(
				"127.0.0.1:8118", "0.0.0.0:8118",
				"host: api.example.com", "host: '*.github.io'",
				"Bearer {{ .password }}", "{{ . }}",
			).Replace(httpProxy) + "    - {host: co.uk, credentials: app, inject: {basic: {username: '{{ .username }}'}}}\n",
			wantStderr: []string{
				`http.listen: "0.0.0.0:8118" is not a loopback address: the proxy does not authenticate its clients, so anyone ` +
					`who can reach it can send requests with the routes' credentials; listen on 127.0.0.1, or set http.allow_non_loopback: true to accept that`,
				`http.routes[0].host: "*.github.io": github.io is a public suffix, so the wildcard matches domains anyone can register; name a registered domain, e.g. *.example.com`,
				`http.routes[0].inject.header.value: {{.}} uses the whole secret, not one field: it would send every field, the password too; ` +
					`name the field, e.g. {{ .token }} or {{ index . "api-key" }}`,
				`warning: http.routes[1].host: "co.uk" is a public suffix (a top-level or registry domain), not a host an API is served from; ` +
					`did you mean a name under it?`,
			}},
		{name: "opt-in to a non-loopback listener", code: 0, wantStdout: true,
			src: secrets + strings.Replace(httpProxy, "listen: 127.0.0.1:8118", "listen: 0.0.0.0:8118\n  allow_non_loopback: true", 1)},
		{name: "refused when built", code: 1,
			src: secrets + strings.Replace(httpProxy, "key_file: ca-key.pem", "key_file: other/ca-key.pem", 1) +
				strings.Replace(pgService, "credentials: app", "credentials: app\n    client_tls: {cert_file: ca.pem, key_file: other/ca-key.pem}", 1),
			wantStderr: []string{
				"postgres[0]: postgres appdb: load client_tls certificate: tls: private key does not match public key",
				"http.ca.key_file: does not match the certificate in http.ca.cert_file",
			}},
		{name: "refused when built, with warnings", code: 1,
			src: secrets + strings.NewReplacer("key_file: ca-key.pem", "key_file: other/ca-key.pem", "host: api.example.com", "host: 127.0.0.1:9000").Replace(httpProxy),
			wantStderr: []string{
				"http.ca.key_file: does not match the certificate in http.ca.cert_file",
				`warning: http.routes[0].host: "127.0.0.1:9000" is this machine (loopback): the credential goes to whatever process ` +
					`listens on that port, and any local user can bind a free port first`,
			}},
		{name: "CA key readable by others", code: 1, src: secrets + httpProxy,
			setup: func(t *testing.T, dir string) {
				if err := os.Chmod(filepath.Join(dir, "ca-key.pem"), 0o644); err != nil {
					t.Fatal(err)
				}
			},
			wantStderr: []string{
				"http.ca.key_file: {dir}/ca-key.pem is mode 0644: a private key must be readable by its owner only " +
					"(chmod 600; 640 is accepted for a root-owned file); whoever can read it can intercept every app that trusts the CA",
			}},
		{name: "secret file is a directory", code: 1,
			src: strings.Replace(secrets, "password_file: app.pw", "password_file: sub", 1) + pgService,
			setup: func(t *testing.T, dir string) {
				if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
					t.Fatal(err)
				}
			},
			wantStderr: []string{"secrets.app.static.password_file: {dir}/sub is a directory, not a file"}},
		{name: "template names a missing field", code: 1,
			src:        secrets + strings.Replace(httpProxy, "{{ .password }}", "{{ .token }}", 1),
			wantStderr: []string{`http.routes[0].inject.header.value: secret "app" has no field "token" (it has password, username)`}},
		{name: "duplicate route", code: 1,
			src:        secrets + httpProxy + "    - {host: 'API.example.com.:443', credentials: app, inject: {basic: {username: '{{ .username }}'}}}\n",
			wantStderr: []string{`http.routes[1].host: duplicate route for "API.example.com.:443" (also http.routes[0], "api.example.com": a route without a port matches ports 443 and 80)`}},
		{name: "metadata route", code: 1,
			src: secrets + strings.Replace(httpProxy, "host: api.example.com", "host: 169.254.169.254", 1),
			wantStderr: []string{`http.routes[0].host: "169.254.169.254" is a cloud instance-metadata or link-local address: ` +
				`a route there would open the metadata service, and this machine's own credentials, to the apps`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := workdir(t)
			if tt.setup != nil {
				tt.setup(t, dir)
			}
			path := writeConfig(t, dir, tt.src)
			code, stdout, stderr := cli(t, "validate", "--config", path)
			if code != tt.code {
				t.Errorf("exit %d, want %d", code, tt.code)
			}
			wantOut := ""
			if tt.wantStdout {
				wantOut = path + ": valid\n"
			}
			if stdout != wantOut {
				t.Errorf("stdout = %q, want %q", stdout, wantOut)
			}
			wantErr := ""
			for _, l := range tt.wantStderr {
				wantErr += strings.ReplaceAll(l, "{dir}", dir) + "\n"
			}
			if stderr != wantErr {
				t.Errorf("stderr:\n%s\nwant:\n%s", stderr, wantErr)
			}
		})
	}
}

// validate binds nothing, contacts nothing and writes nothing: its
// listener addresses are taken, its upstream and Vault count connections,
// and its audit log does not exist.
func TestValidateHasNoSideEffects(t *testing.T) {
	dir := workdir(t)
	var taken [3]string // admin, postgres, http
	for i := range taken {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		taken[i] = ln.Addr().String()
	}
	var dials atomic.Int32
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
			dials.Add(1)
			c.Close()
		}
	}()
	defer func() { up.Close(); <-done }()
	var vaultRequests atomic.Int32
	vault := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		vaultRequests.Add(1)
		http.Error(w, "permission denied", http.StatusForbidden)
	}))
	defer vault.Close()
	if err := os.WriteFile(filepath.Join(dir, "vault-token"), []byte("t\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	path := writeConfig(t, dir, `
admin: {listen: "`+taken[0]+`"}
audit: {path: audit.jsonl}
secrets:
  dyn: {vault: {path: database/creds/app}}
  app: {static: {token_file: app.pw}}
vault:
  address: `+vault.URL+`
  auth: {method: token, token_file: vault-token}
postgres:
  - name: appdb
    listen: "`+taken[1]+`"
    upstream: `+up.Addr().String()+`
    credentials: dyn
    tls: {mode: verify-full, ca_file: ca.pem}
http:
  listen: "`+taken[2]+`"
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - {host: api.example.com, credentials: app, inject: {header: {name: Authorization, value: "Bearer {{ .token }}"}}}
`)
	code, stdout, stderr := cli(t, "validate", "--config", path)
	if code != 0 || stderr != "" || stdout != path+": valid\n" {
		t.Errorf("validate: exit %d, stdout %q, stderr %q; want 0, valid, nothing", code, stdout, stderr)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("validate connected to the upstream %d times", n)
	}
	if n := vaultRequests.Load(); n != 0 {
		t.Errorf("validate sent Vault %d requests", n)
	}
	if _, err := os.Stat(filepath.Join(dir, "audit.jsonl")); !os.IsNotExist(err) {
		t.Errorf("validate created the audit log (stat: %v)", err)
	}
}

func TestValidateUsage(t *testing.T) {
	dir := workdir(t)
	path := writeConfig(t, dir, secrets+pgService)
	t.Setenv("CREDPROXY_CONFIG", path)
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string // a prefix
	}{
		{name: "config from the environment", args: []string{"validate"}, code: 0, stdout: path + ": valid\n"},
		{name: "missing file", args: []string{"validate", "--config", filepath.Join(dir, "nope.yaml")}, code: 1,
			stderr: "read config: open " + filepath.Join(dir, "nope.yaml") + ": no such file or directory\n"},
		{name: "extra argument", args: []string{"validate", "extra"}, code: 2, stderr: `credproxy validate: unexpected argument "extra"`},
		{name: "unknown flag", args: []string{"validate", "--bogus"}, code: 2, stderr: "credproxy validate: flag provided but not defined: -bogus"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := cli(t, tt.args...)
			if code != tt.code || stdout != tt.stdout || !strings.HasPrefix(stderr, tt.stderr) {
				t.Errorf("exit %d, stdout %q, stderr %q; want %d, %q, stderr starting %q", code, stdout, stderr, tt.code, tt.stdout, tt.stderr)
			}
		})
	}
}

// logLines decodes run's JSON log lines.
func logLines(t *testing.T, stderr string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// run logs the warnings validate prints, at start; here the start then
// fails on a taken address, so the test needs no signals.
func TestRunLogsWarnings(t *testing.T) {
	dir := workdir(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	path := writeConfig(t, dir, secrets+strings.NewReplacer(
		"127.0.0.1:8118", taken.Addr().String(),
		"host: api.example.com", "host: 10.0.0.9",
	).Replace(httpProxy))

	_, _, vstderr := cli(t, "validate", "--config", path)
	code, _, stderr := cli(t, "run", "--config", path)
	if code != 1 {
		t.Errorf("run: exit %d, want 1 (address in use)", code)
	}
	var warned []string
	for _, l := range logLines(t, stderr) {
		if l["msg"] == "config warning" {
			if l["level"] != "warn" || l["config"] != path {
				t.Errorf("warning logged as %v", l)
			}
			warned = append(warned, "warning: "+l["key"].(string)+": "+l["warning"].(string)+"\n")
		}
	}
	if got := strings.Join(warned, ""); got != vstderr || got == "" {
		t.Errorf("run logged warnings:\n%s\nvalidate printed:\n%s", got, vstderr)
	}
}

// run refuses what validate refuses, before binding anything.
func TestRunRefusesInvalidConfig(t *testing.T) {
	dir := workdir(t)
	path := writeConfig(t, dir, secrets+strings.Replace(httpProxy, "127.0.0.1:8118", "0.0.0.0:0", 1))
	code, _, stderr := cli(t, "run", "--config", path)
	if code != 1 {
		t.Errorf("run: exit %d, want 1", code)
	}
	lines := logLines(t, stderr)
	if len(lines) != 1 || lines[0]["msg"] != "invalid config" ||
		!strings.HasPrefix(lines[0]["problem"].(string), `http.listen: "0.0.0.0:0" is not a loopback address`) {
		t.Errorf("run logged %v; want one invalid config line about http.listen", lines)
	}
}
