package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fixtureFiles exist in every fixture directory; configs name them relatively.
var fixtureFiles = []string{
	"ca.pem", "ca-key.pem", "db-ca.pem", "client.pem", "client-key.pem",
	"app.pw", "vault-ca.pem", "role-id", "secret-id", "jwt", "vault-token",
}

// fixture returns a directory holding fixtureFiles and a subdirectory "adir".
func fixture(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range fixtureFiles {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// parseLines parses src with baseDir dir and returns the config and the
// problems, one per line.
func parseLines(t *testing.T, dir, src string) (*Config, []string) {
	t.Helper()
	cfg, err := Parse([]byte(src), dir)
	if (cfg == nil) == (err == nil) {
		t.Fatalf("Parse returned config %v and error %v; want exactly one", cfg != nil, err)
	}
	return cfg, Lines(err)
}

// checkLines fails unless got has exactly len(want) lines and each want is
// a substring of its own line of got, in any order.
func checkLines(t *testing.T, got, want []string) {
	t.Helper()
	used := make([]bool, len(got))
	ok := len(got) == len(want)
	for _, w := range want {
		found := false
		for i, g := range got {
			if !used[i] && strings.Contains(g, w) {
				used[i], found = true, true
				break
			}
		}
		if !found {
			ok = false
			t.Errorf("missing problem %q", w)
		}
	}
	if !ok {
		t.Errorf("got %d problems:\n\t%s\nwant %d:\n\t%s",
			len(got), strings.Join(got, "\n\t"), len(want), strings.Join(want, "\n\t"))
	}
}

// unsetenv unsets name for the test and restores it afterwards.
func unsetenv(t *testing.T, name string) {
	t.Helper()
	t.Setenv(name, "") // registers the restore
	os.Unsetenv(name)
}

// minimalPostgres is a valid config other tests extend.
const minimalPostgres = `
secrets:
  app: {static: {username: app, password_file: app.pw}}
postgres:
  - name: appdb
    listen: 127.0.0.1:6432
    upstream: db.internal
    credentials: app
`
