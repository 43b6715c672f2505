package config

import (
	"strings"
	"testing"
)

func TestExpand(t *testing.T) {
	env := map[string]string{"HOST": "db.internal", "EMPTY": "", "PORT": "5432"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	tests := []struct {
		name, in, want string
		problems       []string
	}{
		{name: "no dollar", in: "plain", want: "plain"},
		{name: "variable", in: "${HOST}", want: "db.internal"},
		{name: "embedded twice", in: "${HOST}:${PORT}", want: "db.internal:5432"},
		{name: "default unused", in: "${HOST:-other}", want: "db.internal"},
		{name: "default for unset", in: "${NOPE:-fallback}", want: "fallback"},
		{name: "default for empty", in: "${EMPTY:-fallback}", want: "fallback"},
		{name: "empty default", in: "a${NOPE:-}b", want: "ab"},
		{name: "default with colon", in: "${NOPE:-http://x:1}", want: "http://x:1"},
		{name: "set but empty", in: "[${EMPTY}]", want: "[]"},
		{name: "double dollar", in: "pa$$word", want: "pa$word"},
		{name: "escaped brace", in: "$${HOST}", want: "${HOST}"},
		{name: "four dollars", in: "$$$$", want: "$$"},
		{name: "escape then variable", in: "$$${HOST}", want: "$db.internal"},
		{name: "lone dollar kept", in: "a$b", want: "a$b"},
		{name: "trailing dollar kept", in: "cost$", want: "cost$"},
		{name: "unset", in: "${NOPE}", problems: []string{"environment variable NOPE is not set"}},
		{name: "two unset", in: "${A1}-${A2}", problems: []string{
			"environment variable A1 is not set", "environment variable A2 is not set"}},
		{name: "unterminated", in: "x${HOST", problems: []string{`unterminated ${ in "x${HOST"`}},
		{name: "empty name", in: "${}", problems: []string{"invalid variable reference ${}"}},
		{name: "bad name", in: "${1X}", problems: []string{"invalid variable reference ${1X}"}},
		{name: "dash without colon", in: "${X-d}", problems: []string{"invalid variable reference ${X-d}"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, problems := expand(tt.in, lookup)
			if len(problems) != len(tt.problems) {
				t.Fatalf("expand(%q) problems = %q, want %q", tt.in, problems, tt.problems)
			}
			for i := range problems {
				if !strings.Contains(problems[i], tt.problems[i]) {
					t.Errorf("expand(%q) problem %d = %q, want it to contain %q", tt.in, i, problems[i], tt.problems[i])
				}
			}
			if len(tt.problems) == 0 && got != tt.want {
				t.Errorf("expand(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseExpandsValues(t *testing.T) {
	dir := fixture(t)
	t.Setenv("DB_HOST", "db.example.com")
	t.Setenv("GRACE", "5s")
	t.Setenv("QUERIES", "true")
	t.Setenv("MAXC", "7")
	t.Setenv("PW_FILE", "app.pw")
	t.Setenv("SECRET_NAME", "app")
	cfg, lines := parseLines(t, dir, `
shutdown_grace: ${GRACE}
audit: {queries: "${QUERIES}"}
secrets:
  app:
    static: {username: "u$$er", password_file: "${PW_FILE}"}
postgres:
  - name: appdb
    listen: ${LISTEN:-127.0.0.1:6432}
    upstream: ${DB_HOST}
    credentials: ${SECRET_NAME}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - host: api.example.com
      credentials: app
      max_concurrent: ${MAXC}
      inject: {basic: {username: "{{ .username }}"}}
`)
	if len(lines) > 0 {
		t.Fatalf("unexpected problems:\n%s", strings.Join(lines, "\n"))
	}
	checks := []struct{ name, got, want string }{
		{"shutdown_grace", cfg.ShutdownGrace.String(), "5s"},
		{"postgres[0].listen", cfg.Postgres[0].Listen, "127.0.0.1:6432"},
		{"postgres[0].upstream", cfg.Postgres[0].Upstream, "db.example.com:5432"},
		{"postgres[0].credentials", cfg.Postgres[0].Credentials, "app"},
		{"secrets.app.static.username", cfg.Secrets["app"].Static["username"], "u$er"},
		{"secrets.app.static.password_file", cfg.Secrets["app"].Static["password_file"], dir + "/app.pw"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	if !cfg.Audit.Queries {
		t.Errorf("audit.queries = false, want true")
	}
	if got := cfg.HTTP.Routes[0].MaxConcurrent; got != 7 {
		t.Errorf("max_concurrent = %d, want 7", got)
	}
}

func TestParseExpansionErrors(t *testing.T) {
	dir := fixture(t)
	unsetenv(t, "CP_UNSET_HOST")
	unsetenv(t, "CP_UNSET_GRACE")
	t.Setenv("CP_NOT_A_NUMBER", "lots")
	tests := []struct {
		name, src string
		want      []string
	}{
		{
			name: "unset variable reports its key path and nothing else",
			src: `
secrets:
  app: {static: {username: app, password_file: app.pw}}
postgres:
  - {name: appdb, listen: "127.0.0.1:6432", upstream: "${CP_UNSET_HOST}", credentials: app}
`,
			want: []string{"postgres[0].upstream: environment variable CP_UNSET_HOST is not set"},
		},
		{
			name: "unset in a duration and in a map value",
			src: `
shutdown_grace: ${CP_UNSET_GRACE}
secrets:
  app: {static: {username: "${CP_UNSET_HOST}", password_file: app.pw}}
postgres:
  - {name: appdb, listen: "127.0.0.1:6432", upstream: db, credentials: app}
`,
			want: []string{
				"shutdown_grace: environment variable CP_UNSET_GRACE is not set",
				"secrets.app.static.username: environment variable CP_UNSET_HOST is not set",
			},
		},
		{
			name: "expanded value of the wrong type",
			src: minimalPostgres + `
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
  routes:
    - {host: a.example.com, credentials: app, max_concurrent: "${CP_NOT_A_NUMBER}", inject: {basic: {username: u}}}
`,
			want: []string{`http.routes[0].max_concurrent: must be an integer, not "lots"`},
		},
		{
			name: "keys are not expanded",
			src:  minimalPostgres + "${CP_UNSET_HOST}: 1\n",
			want: []string{"${CP_UNSET_HOST}: unknown key"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, lines := parseLines(t, dir, tt.src)
			checkLines(t, lines, tt.want)
		})
	}
}
