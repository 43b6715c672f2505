package config

import (
	"os"
	"testing"
)

// FuzzParse checks that no input makes Parse panic or hang, and that it
// returns exactly one of a config and an error.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		"",
		minimalPostgres,
		appSecret + pg("tls: {mode: verify-ca, ca_file: db-ca.pem}", "client_tls: {cert_file: a, key_file: b}"),
		appSecret + route("host: '*.example.com:8443'", "credentials: app", "inject: {header: {name: X, value: '{{ .password }}'}}"),
		"secrets:\n  s: {vault: {path: p, field_map: {a: b}}}\n" + tokenVault + pg(),
		"shutdown_grace: ${CP_FUZZ:-1s}\npostgres: [{<<: &a {name: x}, listen: '$${x}'}, *a]\n",
		"a: &x {b: *x}\n",
		"- [a, {b: c}]\n",
		"postgres: {<<: [*undefined]}\n",
	} {
		f.Add([]byte(seed))
	}
	dir := f.TempDir()
	for _, name := range fixtureFiles {
		if err := os.WriteFile(dir+"/"+name, []byte("x"), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, dir)
		if (cfg == nil) == (err == nil) {
			t.Fatalf("Parse returned config %v and error %v; want exactly one", cfg != nil, err)
		}
		if err != nil && len(Lines(err)) == 0 {
			t.Fatalf("error %v has no lines", err)
		}
	})
}
