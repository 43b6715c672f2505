package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/integration/vaulttest"
)

// Which Vault the Vault tests run against:
//
//   - VAULT_ADDR and VAULT_TOKEN set: that server (a shared one: every name a
//     test creates carries a per-test prefix, and is removed at the end). It
//     must run on this machine, since its database plugin connects to the
//     test's PostgreSQL on 127.0.0.1 and its file audit device writes into
//     the test's temp dir. Vault-down tests skip: it cannot be stopped.
//   - else VAULT_BIN set: `$VAULT_BIN server -dev` (vault or bao) per test,
//     on a free port, killed at the end; "Vault down" is SIGSTOP/SIGCONT,
//     since a dev server loses its state on restart.
//   - else integration/vaulttest, in process.
//
// Tests configure Vault only through its HTTP API, so they pass unchanged
// against each of them.

// testVault is one Vault for one test.
type testVault struct {
	Client *vault.Client // admin client holding the root (or given) token
	Addr   string        // base URL, http://127.0.0.1:port

	kind      string // "vaulttest", "dev server" or "external"
	fake      *vaulttest.Server
	proc      *exec.Cmd
	caFile    string // VAULT_CACERT of an external server
	prefix    string // prepended to every mount, auth mount, policy and audit device name
	auditPath string // the raw file audit device's log
	dir       string
}

// startVault returns a Vault for the test, with a raw file audit device
// (log_raw) whose log counts requests and feeds every token, secret id,
// lease id and database password Vault hands out to the no-leak collector
// when the test ends.
func startVault(t *testing.T) *testVault {
	t.Helper()
	v := &testVault{dir: t.TempDir()}
	addr, token := os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN")
	switch {
	case addr != "" && token != "":
		v.kind = "external"
		v.Addr = addr
		v.caFile = os.Getenv("VAULT_CACERT")
		v.prefix = "credproxy-" + randomHex(t, 4) + "-"
		cfg := vault.DefaultConfig()
		cfg.Address = addr
		cfg.MaxRetries = 0
		c, err := vault.NewClient(cfg)
		if err != nil {
			t.Fatalf("vault client for %s: %v", addr, err)
		}
		c.SetToken(token)
		v.Client = c
		leaks.addSecret("the VAULT_TOKEN of the external Vault", token)
	case os.Getenv("VAULT_BIN") != "":
		v.kind = "dev server"
		v.startDevServer(t, os.Getenv("VAULT_BIN"))
	default:
		v.kind = "vaulttest"
		v.fake = vaulttest.Start(t, vaulttest.Options{})
		v.Addr = v.fake.URL()
		v.Client = v.fake.Client(t)
		leaks.addSecret(fmt.Sprintf("the root token of %s's Vault", t.Name()), v.fake.RootToken())
	}
	t.Logf("vault: %s at %s", v.kind, v.Addr)

	// The audit dir must be writable by a Vault running as another user,
	// and the log readable by us.
	if err := os.Chmod(v.dir, 0o777); err != nil {
		t.Fatal(err)
	}
	v.auditPath = filepath.Join(v.dir, "vault-audit.jsonl")
	err := v.Client.Sys().EnableAuditWithOptions(v.name("audit"), &vault.EnableAuditOptions{
		Type:    "file",
		Options: map[string]string{"file_path": v.auditPath, "log_raw": "true", "mode": "0644"},
	})
	if err != nil {
		t.Fatalf("enable the file audit device: %v", err)
	}
	// Registered after the server (closed last) and before any proxy
	// (closed first): runs once the proxy has revoked its leases.
	t.Cleanup(func() {
		v.harvestSecrets(t)
		if v.kind == "external" {
			v.removeAll(t)
		}
	})
	return v
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// startDevServer runs `bin server -dev` on a free port until the test ends.
func (v *testVault) startDevServer(t *testing.T, bin string) {
	t.Helper()
	token := "root-" + randomHex(t, 16)
	port := pgtest.FreePort(t)
	v.Addr = fmt.Sprintf("http://127.0.0.1:%d", port)
	logFile, err := os.Create(filepath.Join(v.dir, "vault-server.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "server", "-dev", "-dev-root-token-id="+token,
		fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port))
	// HOME: a dev server writes the root token to ~/.vault-token.
	cmd.Env = append(os.Environ(), "HOME="+v.dir, "VAULT_ADDR=", "VAULT_TOKEN=")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	v.proc = cmd
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT) // in case a test left it stopped
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logFile.Close()
	})
	leaks.addSecret(fmt.Sprintf("the root token of %s's Vault", t.Name()), token)

	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(v.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logFile.Name())
			t.Fatalf("%s dev server not healthy after 30s (last error %v):\n%s", bin, err, tail(out, 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	cfg := vault.DefaultConfig()
	cfg.Address = v.Addr
	cfg.MaxRetries = 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	v.Client = c
}

// name is a per-test name for a mount, auth mount, policy or audit device.
func (v *testVault) name(base string) string { return v.prefix + base }

// canStop says whether stop and restart work, and if not why.
func (v *testVault) canStop() (bool, string) {
	if v.kind == "external" {
		return false, "VAULT_ADDR names an external Vault, which the test cannot stop and restart"
	}
	return true, ""
}

// stop makes Vault unreachable, keeping its state: vaulttest closes its
// listener (connection refused); a dev server is paused with SIGSTOP
// (requests hang), as a restarted dev server would have lost everything.
func (v *testVault) stop(t *testing.T) {
	t.Helper()
	switch {
	case v.fake != nil:
		v.fake.Stop()
	case v.proc != nil:
		if err := v.proc.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatalf("SIGSTOP vault: %v", err)
		}
	default:
		t.Fatalf("cannot stop a %s Vault", v.kind)
	}
}

func (v *testVault) restart(t *testing.T) {
	t.Helper()
	switch {
	case v.fake != nil:
		if err := v.fake.Restart(); err != nil {
			t.Fatalf("restart vault: %v", err)
		}
	case v.proc != nil:
		if err := v.proc.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatalf("SIGCONT vault: %v", err)
		}
	default:
		t.Fatalf("cannot restart a %s Vault", v.kind)
	}
}

// write is Logical().Write, failing the test on error.
func (v *testVault) write(t *testing.T, path string, data map[string]any) *vault.Secret {
	t.Helper()
	s, err := v.Client.Logical().Write(path, data)
	if err != nil {
		t.Fatalf("vault write %s: %v", path, err)
	}
	return s
}

func (v *testVault) mount(t *testing.T, path string, in *vault.MountInput) {
	t.Helper()
	if err := v.Client.Sys().Mount(path, in); err != nil {
		t.Fatalf("vault mount %s (%s): %v", path, in.Type, err)
	}
}

func (v *testVault) enableAuth(t *testing.T, path, typ string) {
	t.Helper()
	if err := v.Client.Sys().EnableAuthWithOptions(path, &vault.EnableAuthOptions{Type: typ}); err != nil {
		t.Fatalf("vault auth enable %s (%s): %v", path, typ, err)
	}
}

// removeAll undoes what a test created on an external Vault: mounts (which
// revokes their leases), auth mounts, policies and the audit device.
func (v *testVault) removeAll(t *testing.T) {
	t.Helper()
	c := v.Client
	if mounts, err := c.Sys().ListMounts(); err == nil {
		for p := range mounts {
			if strings.HasPrefix(p, v.prefix) {
				_ = c.Sys().Unmount(p)
			}
		}
	}
	if auths, err := c.Sys().ListAuth(); err == nil {
		for p := range auths {
			if strings.HasPrefix(p, v.prefix) {
				_ = c.Sys().DisableAuth(p)
			}
		}
	}
	if policies, err := c.Sys().ListPolicies(); err == nil {
		for _, p := range policies {
			if strings.HasPrefix(p, v.prefix) {
				_ = c.Sys().DeletePolicy(p)
			}
		}
	}
	_ = c.Sys().DisableAudit(v.name("audit"))
}

// dbRole is a database secrets engine role for the test's PostgreSQL.
type dbRole struct {
	DefaultTTL, MaxTTL time.Duration
}

// creationStatements create a Vault role that may log in and use the
// tables that exist when it is created (pgbench's among them).
//
// USAGE, not ALL, on the schema: the postgres plugin's default revocation
// revokes table privileges and USAGE and then drops the role; a CREATE
// privilege left on schema public would make DROP ROLE fail ("privileges
// for schema public"), and the lease could not be revoked.
const creationStatements = `CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; ` +
	`GRANT USAGE ON SCHEMA public TO "{{name}}"; ` +
	`GRANT ALL ON ALL TABLES IN SCHEMA public TO "{{name}}";`

// dbEngine is a mounted database secrets engine with one role, "app".
type dbEngine struct {
	Mount string // e.g. "database"
}

// CredsPath is the path credproxy reads.
func (d dbEngine) CredsPath() string { return d.Mount + "/creds/app" }

// setupDatabase mounts the database secrets engine, points it at pg's app
// database as the superuser, and creates role "app" (unless role is nil:
// then only the connection exists, and createRole adds the role later).
func (v *testVault) setupDatabase(t *testing.T, pg *pgtest.Server, role *dbRole) dbEngine {
	t.Helper()
	d := dbEngine{Mount: v.name("database")}
	v.mount(t, d.Mount, &vault.MountInput{Type: "database"})
	v.write(t, d.Mount+"/config/pg", map[string]any{
		"plugin_name":       "postgresql-database-plugin",
		"connection_url":    fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/%s?sslmode=disable", pg.Port, pgtest.AppDB),
		"username":          pgtest.Superuser,
		"password":          pg.Password(pgtest.Superuser),
		"allowed_roles":     "app",
		"verify_connection": true,
	})
	if role != nil {
		v.createRole(t, d, *role)
	}
	return d
}

func (v *testVault) createRole(t *testing.T, d dbEngine, role dbRole) {
	t.Helper()
	v.write(t, d.Mount+"/roles/app", map[string]any{
		"db_name":             "pg",
		"creation_statements": creationStatements,
		"default_ttl":         role.DefaultTTL.String(),
		"max_ttl":             role.MaxTTL.String(),
	})
}

// credproxyPolicy writes the least-privilege policy of the README (read the
// creds path, renew and revoke leases) plus extra rules, and returns its name.
func (v *testVault) credproxyPolicy(t *testing.T, d dbEngine, extra string) string {
	t.Helper()
	name := v.name("credproxy")
	rules := fmt.Sprintf(`
path %q { capabilities = ["read"] }
path "sys/leases/renew"  { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
%s`, d.CredsPath(), extra)
	if err := v.Client.Sys().PutPolicy(name, rules); err != nil {
		t.Fatalf("vault policy write %s: %v", name, err)
	}
	return name
}

// createToken creates a token with the given auth/token/create parameters
// and registers it with the no-leak collector.
func (v *testVault) createToken(t *testing.T, params map[string]any) string {
	t.Helper()
	s := v.write(t, "auth/token/create", params)
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		t.Fatalf("auth/token/create returned no token")
	}
	leaks.addSecret(fmt.Sprintf("a Vault token of %s", t.Name()), s.Auth.ClientToken)
	return s.Auth.ClientToken
}

// tokenFile creates a renewable one-hour token with the credproxy policy
// and writes it to a file for vault.auth.token_file.
func (v *testVault) tokenFile(t *testing.T, d dbEngine) string {
	t.Helper()
	policy := v.credproxyPolicy(t, d, "")
	token := v.createToken(t, map[string]any{"policies": []string{policy}, "ttl": "1h", "renewable": true})
	return writeSecretFile(t, "vault-token", token)
}

// writeSecretFile writes value to a fresh 0600 file and returns its path.
func writeSecretFile(t *testing.T, name, value string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(value+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// replaceFile atomically replaces a credential file's contents, as Vault
// Agent or a kubelet would.
func replaceFile(t *testing.T, path, value string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(value+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// leaseIDs lists the leases Vault holds under prefix (LIST
// sys/leases/lookup/<prefix>/), as full lease ids.
func (v *testVault) leaseIDs(t *testing.T, prefix string) []string {
	t.Helper()
	prefix = strings.Trim(prefix, "/")
	s, err := v.Client.Logical().List("sys/leases/lookup/" + prefix + "/")
	if err != nil {
		t.Fatalf("vault list sys/leases/lookup/%s/: %v", prefix, err)
	}
	if s == nil || s.Data == nil {
		return nil
	}
	keys, _ := s.Data["keys"].([]any)
	var ids []string
	for _, k := range keys {
		ks, _ := k.(string)
		ids = append(ids, prefix+"/"+ks)
	}
	return ids
}

// vaultAuditEntry is the part of a file audit device's entry the tests read.
type vaultAuditEntry struct {
	Type  string `json:"type"`
	Error string `json:"error"`
	Auth  *struct {
		ClientToken string `json:"client_token"`
	} `json:"auth"`
	Request struct {
		Operation   string         `json:"operation"`
		Path        string         `json:"path"`
		ClientToken string         `json:"client_token"`
		Data        map[string]any `json:"data"`
	} `json:"request"`
	Response *struct {
		Auth *struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
		Data   map[string]any `json:"data"`
		Secret *struct {
			LeaseID string `json:"lease_id"`
		} `json:"secret"`
	} `json:"response"`
}

// auditEntries reads Vault's audit log so far.
func (v *testVault) auditEntries(t *testing.T) []vaultAuditEntry {
	t.Helper()
	data, err := os.ReadFile(v.auditPath)
	if err != nil {
		t.Fatalf("read Vault's audit log: %v", err)
	}
	var out []vaultAuditEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var e vaultAuditEntry
		if err := json.Unmarshal(line, &e); err != nil {
			continue // a line being written
		}
		out = append(out, e)
	}
	return out
}

// responses counts the audit log's response entries for op on path; with
// okOnly, only those without an error.
func (v *testVault) responses(t *testing.T, op, path string, okOnly bool) int {
	t.Helper()
	n := 0
	for _, e := range v.auditEntries(t) {
		if e.Type == "response" && e.Request.Operation == op && e.Request.Path == path && (!okOnly || e.Error == "") {
			n++
		}
	}
	return n
}

// credsReads counts successful reads of the creds path, as Vault's audit
// device recorded them (works the same against a real Vault).
func (v *testVault) credsReads(t *testing.T, d dbEngine) int {
	t.Helper()
	return v.responses(t, "read", d.CredsPath(), true)
}

// harvestSecrets registers every secret value Vault's raw audit log shows
// with the no-leak collector: client tokens, lease ids, secret ids, JWTs
// sent to log in, and dynamic database passwords.
func (v *testVault) harvestSecrets(t *testing.T) {
	data, err := os.ReadFile(v.auditPath)
	if err != nil {
		t.Errorf("read Vault's audit log: %v", err)
		return
	}
	label := func(what string) string { return fmt.Sprintf("%s from %s's Vault", what, t.Name()) }
	seen := map[string]bool{}
	kinds := map[string]int{}
	add := func(what, value string) {
		if value == "" || strings.HasPrefix(value, "hmac-sha256:") || seen[value] {
			return
		}
		seen[value] = true
		kinds[what]++
		leaks.addSecret(label(what), value)
	}
	str := func(m map[string]any, k string) string {
		s, _ := m[k].(string)
		return s
	}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		var e vaultAuditEntry
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		n++
		if e.Auth != nil {
			add("a Vault token", e.Auth.ClientToken)
		}
		add("a Vault token", e.Request.ClientToken)
		for _, k := range []string{"lease_id", "url_lease_id"} {
			add("a lease id", str(e.Request.Data, k))
		}
		add("an AppRole secret id", str(e.Request.Data, "secret_id"))
		add("a JWT", str(e.Request.Data, "jwt"))
		add("a Vault token", str(e.Request.Data, "token"))
		if r := e.Response; r != nil {
			if r.Auth != nil {
				add("a Vault token", r.Auth.ClientToken)
			}
			if r.Secret != nil {
				add("a lease id", r.Secret.LeaseID)
			}
			if r.Data != nil {
				add("a dynamic database password", str(r.Data, "password"))
				add("an AppRole secret id", str(r.Data, "secret_id"))
				if strings.HasPrefix(e.Request.Path, "auth/token/lookup") {
					add("a Vault token", str(r.Data, "id"))
				}
			}
		}
	}
	if n == 0 {
		t.Errorf("Vault's audit log %s is empty: the no-leak check would learn no Vault secret", v.auditPath)
	}
	t.Logf("no-leak collector: registered from Vault's audit log %v", kinds)
}

// vaultProxyConfig is credproxy with one Postgres service, "appdb", whose
// credential "app-dynamic" comes from secret (a Vault path).
func vaultProxyConfig(v *testVault, pg *pgtest.Server, auth config.VaultAuth, secret config.VaultSecret) *config.Config {
	yes := true
	return &config.Config{
		Secrets: map[string]config.Secret{"app-dynamic": {Vault: &secret}},
		Vault: &config.Vault{
			Address:          v.Addr,
			CAFile:           v.caFile,
			RequestTimeout:   config.Duration(vaultRequestTimeout),
			RevokeOnShutdown: &yes,
			RevokeUnused:     &yes,
			Auth:             auth,
		},
		Postgres: []config.Postgres{pgService("appdb", pg.Addr(), "app-dynamic", config.PostgresTLS{})},
	}
}

// vaultRequestTimeout is vault.request_timeout in these tests: the
// default. A database credential read or renewal runs statements in
// PostgreSQL, which on a busy machine can stall for seconds; a shorter
// timeout turns such a stall into a failed rotation.
const vaultRequestTimeout = 5 * time.Second

func tokenAuth(file string) config.VaultAuth {
	return config.VaultAuth{Method: "token", TokenFile: file}
}

// startVaultPG starts a PostgreSQL whose pg_hba.conf lets any role log in
// with SCRAM over TCP, as Vault's generated roles must.
func startVaultPG(t *testing.T, opts pgtest.Options) *pgtest.Server {
	t.Helper()
	opts.HBA = []string{"host all all 127.0.0.1/32 scram-sha-256"}
	return startPG(t, opts)
}

// dynamicRoles lists the roles named like Vault's (v-...) in pg.
func dynamicRoles(t *testing.T, pg *pgtest.Server) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.DSN(pgtest.Superuser, "postgres"))
	if err != nil {
		t.Fatalf("connect to PostgreSQL as the superuser: %v", err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%' ORDER BY 1`)
	if err != nil {
		t.Fatalf("list roles: %v", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatalf("list roles: %v", err)
	}
	return names
}

// waitNoDynamicRoles waits up to limit for every v- role to be dropped.
func waitNoDynamicRoles(t *testing.T, pg *pgtest.Server, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		roles := dynamicRoles(t, pg)
		if len(roles) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after %v, PostgreSQL still has %d role(s) Vault created for credproxy: %v", limit, len(roles), roles)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// metric sums the samples of a credproxy metric whose labels include
// labels; for a histogram, name may end in _count (its sample count).
func metric(t *testing.T, p *proxyHarness, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := p.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	base, isCount := strings.CutSuffix(name, "_count")
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name && !(isCount && mf.GetName() == base) {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for k, want := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == want {
						found = true
					}
				}
				if !found {
					continue series
				}
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum
}

// sessionResult is what one app connection through credproxy saw.
type sessionResult struct {
	User    string
	Elapsed time.Duration
	Err     error
}

// trySession connects through credproxy, runs SELECT current_user and
// disconnects. Errors are recorded with the no-leak collector. Safe to call
// from any goroutine.
func trySession(t *testing.T, ctx context.Context, addr string) sessionResult {
	return trySessionDSN(t, ctx, appDSN(addr))
}

// trySessionDSN is trySession with the client's own connection string.
func trySessionDSN(t *testing.T, ctx context.Context, dsn string) sessionResult {
	start := time.Now()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return sessionResult{Err: err}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return sessionResult{Elapsed: time.Since(start), Err: clientErr(t, err)}
	}
	defer conn.Close(context.Background())
	var user string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
		return sessionResult{Elapsed: time.Since(start), Err: clientErr(t, err)}
	}
	return sessionResult{User: user, Elapsed: time.Since(start)}
}

// mustSession is trySession, failing the test on error or a user that is
// not one Vault created.
func mustSession(t *testing.T, ctx context.Context, addr, what string) string {
	t.Helper()
	r := trySession(t, ctx, addr)
	if r.Err != nil {
		t.Fatalf("%s: session through credproxy failed after %v: %v", what, r.Elapsed.Round(time.Millisecond), r.Err)
	}
	if !strings.HasPrefix(r.User, "v-") {
		t.Fatalf("%s: current_user = %q, want a role Vault created (v-...)", what, r.User)
	}
	return r.User
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// approle enables AppRole at a per-test mount with role "credproxy"
// (token_policies policy plus params) and writes its role id and a new
// secret id to files.
func (v *testVault) approle(t *testing.T, policy string, params map[string]any) config.VaultAuth {
	t.Helper()
	mount := v.name("approle")
	v.enableAuth(t, mount, "approle")
	params["token_policies"] = []string{policy}
	v.write(t, "auth/"+mount+"/role/credproxy", params)
	rid, err := v.Client.Logical().Read("auth/" + mount + "/role/credproxy/role-id")
	if err != nil || rid == nil {
		t.Fatalf("read role-id: %v", err)
	}
	sid := v.write(t, "auth/"+mount+"/role/credproxy/secret-id", nil)
	if sid == nil {
		t.Fatal("secret-id: empty response")
	}
	roleID, _ := rid.Data["role_id"].(string)
	secretID, _ := sid.Data["secret_id"].(string)
	leaks.addSecret("an AppRole secret id of "+t.Name(), secretID)
	return config.VaultAuth{Method: "approle", Mount: mount,
		RoleIDFile: writeSecretFile(t, "role-id", roleID), SecretIDFile: writeSecretFile(t, "secret-id", secretID)}
}

// sessionsFor opens a session every interval for d; each must succeed.
func sessionsFor(t *testing.T, ctx context.Context, addr string, d, interval time.Duration) map[string]int {
	t.Helper()
	users := map[string]int{}
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(interval) {
		users[mustSession(t, ctx, addr, fmt.Sprintf("session at %s", time.Now().Format("15:04:05.000")))]++
	}
	return users
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
