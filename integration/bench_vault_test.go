package integration

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/integration/vaulttest"
)

// TestBenchVaultConnectionRate is the Vault row of `make bench`, not a test:
// it runs only with CREDPROXY_BENCH=1 and prints the pgbench -C connection
// rate through a Vault-backed service next to a static one on the same
// proxy and database. Nothing is asserted about the figures.
func TestBenchVaultConnectionRate(t *testing.T) {
	if os.Getenv("CREDPROXY_BENCH") != "1" {
		t.Skip("a benchmark: run by `make bench` (CREDPROXY_BENCH=1)")
	}
	secs := 20
	if v, err := strconv.Atoi(os.Getenv("BENCH_SECONDS")); err == nil && v > 0 {
		secs = v
	}
	pg := startPG(t, pgtest.Options{MaxConnections: 300,
		HBA: []string{"host all all 127.0.0.1/32 scram-sha-256"}})
	pg.ExecDB(t, pgtest.AppDB, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC")

	vs := vaulttest.Start(t, vaulttest.Options{})
	vc := vs.Client(t)
	if err := vc.Sys().Mount("database", &vault.MountInput{Type: "database"}); err != nil {
		t.Fatal(err)
	}
	write := func(path string, data map[string]any) {
		t.Helper()
		if _, err := vc.Logical().Write(path, data); err != nil {
			t.Fatalf("vault write %s: %v", path, err)
		}
	}
	write("database/config/pg", map[string]any{
		"plugin_name":    "postgresql-database-plugin",
		"connection_url": fmt.Sprintf("postgresql://{{username}}:{{password}}@%s/%s?sslmode=disable", pg.Addr(), pgtest.AppDB),
		"username":       pgtest.Superuser,
		"password":       pg.Password(pgtest.Superuser),
		"allowed_roles":  "app",
	})
	// A TTL longer than the run: this measures the cached path, which is
	// what a connection pays for once the credential is warm.
	write("database/roles/app", map[string]any{
		"db_name":             "pg",
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`},
		"default_ttl":         "1h",
		"max_ttl":             "2h",
	})
	tokenFile := writeFile(t, "vault-token", vs.RootToken())
	leaks.addSecret("the bench's Vault root token", vs.RootToken())

	yes := true
	cfg := &config.Config{
		Secrets: map[string]config.Secret{
			"static":  staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser)),
			"dynamic": {Vault: &config.VaultSecret{Path: "database/creds/app", RefreshInterval: config.Duration(5 * time.Minute)}},
		},
		Vault: &config.Vault{Address: vs.URL(), RequestTimeout: config.Duration(5 * time.Second),
			RevokeOnShutdown: &yes, RevokeUnused: &yes,
			Auth: config.VaultAuth{Method: "token", TokenFile: tokenFile}},
		Postgres: []config.Postgres{
			pgService("static", pg.Addr(), "static", config.PostgresTLS{}),
			pgService("dynamic", pg.Addr(), "dynamic", config.PostgresTLS{}),
		},
	}
	p := startProxy(t, cfg)

	initDSN := pg.DSN(pgtest.Superuser, pgtest.AppDB)
	if _, all, err := runClient(t, 5*time.Minute, "pgbench", "-i", "-s", "1", "-q", initDSN); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, all)
	}
	pg.ExecDB(t, pgtest.AppDB, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC")

	rate := func(name string) float64 {
		addr := p.addr(t, name)
		host, port := hostPort(t, addr)
		_, all, err := runClient(t, time.Duration(secs+60)*time.Second, "pgbench", "-C", "-S", "-n",
			"-c", "8", "-j", "2", "-T", strconv.Itoa(secs),
			"-h", host, "-p", port, "-U", "app", pgtest.AppDB)
		if err != nil {
			t.Fatalf("pgbench -C through %s: %v\n%s", name, err, all)
		}
		m := regexp.MustCompile(`tps = ([0-9.]+)`).FindStringSubmatch(all)
		if m == nil {
			t.Fatalf("no tps in pgbench output:\n%s", all)
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return v
	}
	static := rate("static")
	dynamic := rate("dynamic")
	fmt.Printf("BENCH vault connections/s (-C -S, 8 clients, %ds): static %.0f  vault %.0f  ratio %.2fx (target >= 0.95x); vault creds reads: %d\n",
		secs, static, dynamic, dynamic/static, vs.Count("database/creds/app"))
}

// writeFile writes a 0600 file in a temp dir and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := t.TempDir() + "/" + name
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func hostPort(t *testing.T, addr string) (string, string) {
	t.Helper()
	for i := len(addr) - 1; i >= 0; i-- {
		if addr[i] == ':' {
			return addr[:i], addr[i+1:]
		}
	}
	t.Fatalf("no port in %q", addr)
	return "", ""
}
