package config

import (
	"strings"
	"testing"
	"time"
)

func TestParseUnknownKeys(t *testing.T) {
	dir := fixture(t)
	_, lines := parseLines(t, dir, `
shutdown_grace: 1s
listen: 127.0.0.1:1
audit: {path: "-", querys: true}
secrets:
  app:
    static: {username: app, password_file: app.pw}
    vualt: {path: x}
  dyn:
    vault: {path: p, fieldmap: {a: b}}
vault:
  address: http://127.0.0.1:8200
  auth: {method: approle, role_id_file: role-id, secret_id_file: secret-id, rol: x}
postgres:
  - name: appdb
    listen: 127.0.0.1:6432
    upstream: db
    credentials: app
    tlss: {mode: disable}
  - name: other
    listen: 127.0.0.1:6433
    upstream: db
    credentials: app
    tls: {mode: disable, moed: require}
    client_tls: {cert_file: client.pem, key_file: client-key.pem, ca_file: x}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem, password: x}
  routes:
    - host: api.example.com
      credentials: app
      inject: {header: {nam: Authorization, value: x}}
      retries: 3
`)
	checkLines(t, lines, []string{
		"listen: unknown key",
		`audit.querys: unknown key (did you mean "queries"?)`,
		"secrets.app.vualt: unknown key",
		"secrets.dyn.vault.fieldmap: unknown key",
		`vault.auth.rol: unknown key (did you mean "role"?)`,
		`postgres[0].tlss: unknown key (did you mean "tls"?)`,
		"postgres[1].tls.moed: unknown key",
		"postgres[1].client_tls.ca_file: unknown key",
		"http.ca.password: unknown key",
		"http.routes[0].inject.header.nam: unknown key",
		"http.routes[0].retries: unknown key",
		// Consequences of the misspellings, each on its own key path.
		"http.routes[0].inject.header.name: required",
	})
}

func TestParseTypeErrors(t *testing.T) {
	dir := fixture(t)
	tests := []struct {
		name, src string
		want      []string
	}{
		{
			name: "bad duration",
			src:  "shutdown_grace: soon\n" + minimalPostgres,
			want: []string{`shutdown_grace: invalid duration "soon": use a Go duration such as "90s" or "1h"`},
		},
		{
			name: "duration without unit",
			src:  "shutdown_grace: 30\n" + minimalPostgres,
			want: []string{`shutdown_grace: invalid duration "30"`},
		},
		{
			name: "duration given a list",
			src:  "shutdown_grace: [1s]\n" + minimalPostgres,
			want: []string{"shutdown_grace: must be a scalar, not a list"},
		},
		{
			name: "bool",
			src:  "audit: {queries: maybe}\n" + minimalPostgres,
			want: []string{`audit.queries: must be true or false, not "maybe"`},
		},
		{
			name: "mapping where a list belongs",
			src:  "postgres: {name: x}\n",
			want: []string{"postgres: must be a list, not a mapping"},
		},
		{
			name: "scalar where a mapping belongs",
			src:  minimalPostgres + "    tls: verify-full\n",
			want: []string{"postgres[0].tls: must be a mapping, not a scalar"},
		},
		{
			name: "list where a map belongs",
			src:  "secrets: [a, b]\npostgres: []\n",
			want: []string{"secrets: must be a mapping, not a list", "postgres: at least one of postgres or http"},
		},
		{
			name: "mapping where a string belongs",
			src: `
secrets:
  app: {static: {username: {nested: x}, password_file: app.pw}}
postgres:
  - {name: appdb, listen: "127.0.0.1:6432", upstream: db, credentials: app}
`,
			want: []string{"secrets.app.static.username: must be a string, not a mapping"},
		},
		{
			name: "duplicate key",
			src:  minimalPostgres + "    listen: 127.0.0.1:7000\n",
			want: []string{"postgres[0].listen: duplicate key (first set on line 6)"},
		},
		{
			name: "document is a list",
			src:  "- a\n- b\n",
			want: []string{"config must be a mapping of keys, not a list"},
		},
		{
			name: "syntax error",
			src:  "postgres:\n  - name: a\n   bad: [\n",
			want: []string{"parse config: yaml: line"},
		},
		{
			name: "two documents",
			src:  minimalPostgres + "---\nshutdown_grace: 1s\n",
			want: []string{"parse config: line 9: only one YAML document is allowed"},
		},
		{
			name: "merge of its own mapping",
			src:  "postgres: [&x {name: a, <<: *x}]\n",
			want: []string{"postgres[0]: merge key includes its own mapping"},
		},
		{
			name: "merge of a scalar",
			src:  minimalPostgres + "    <<: 5\n",
			want: []string{"postgres[0].<<: merge value must be a mapping or a list of mappings, not a scalar"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, lines := parseLines(t, dir, tt.src)
			checkLines(t, lines, tt.want)
		})
	}
}

func TestParseAliasesAndMerge(t *testing.T) {
	dir := fixture(t)
	cfg, lines := parseLines(t, dir, `
secrets:
  app: {static: {username: app, password_file: app.pw}}
.common: &common
  upstream: db.internal
  credentials: app
  tls: &tls {mode: verify-ca, ca_file: db-ca.pem}
`)
	// Hidden "templates" are not a feature: the top-level key is unknown.
	checkLines(t, lines, []string{".common: unknown key", "postgres: at least one"})
	if cfg != nil {
		t.Fatal("want no config")
	}

	cfg, lines = parseLines(t, dir, `
secrets:
  app: {static: {username: app, password_file: app.pw}}
postgres:
  - &first
    name: one
    listen: 127.0.0.1:6432
    upstream: db.internal
    credentials: app
    tls: &tls {mode: verify-ca, ca_file: db-ca.pem}
  - <<: *first
    name: two
    listen: 127.0.0.1:6433
  - {name: three, listen: "127.0.0.1:6434", upstream: other, credentials: app, tls: *tls}
`)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	if got := len(cfg.Postgres); got != 3 {
		t.Fatalf("got %d postgres entries, want 3", got)
	}
	two := cfg.Postgres[1]
	if two.Name != "two" || two.Listen != "127.0.0.1:6433" || two.Upstream != "db.internal:5432" || two.TLS.Mode != "verify-ca" {
		t.Errorf("merged entry = %+v", two)
	}
	if got := cfg.Postgres[2].TLS.CAFile; got != dir+"/db-ca.pem" {
		t.Errorf("aliased tls.ca_file = %q, want %q", got, dir+"/db-ca.pem")
	}
}

func TestParseAliasBudget(t *testing.T) {
	// Each level multiplies the references by 10: 10^7 static fields if expanded.
	var b strings.Builder
	b.WriteString("secrets:\n  l0: {static: &l0 {a: b}}\n")
	for i := 1; i <= 7; i++ {
		b.WriteString("  l" + string(rune('0'+i)) + ": {static: &l" + string(rune('0'+i)) + " {<<: [")
		for j := range 10 {
			if j > 0 {
				b.WriteString(", ")
			}
			b.WriteString("*l" + string(rune('0'+i-1)))
		}
		b.WriteString("]}}\n")
	}
	start := time.Now()
	_, lines := parseLines(t, t.TempDir(), b.String())
	checkLines(t, lines, []string{"config is too large or repeats aliases too often"})
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Parse took %v on an alias bomb", d)
	}
}
