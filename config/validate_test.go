package config

import (
	"strings"
	"testing"
)

// Snippets the validation cases combine. Paths are relative to fixture().
const (
	appSecret = `
secrets:
  app: {static: {username: app, password_file: app.pw}}
`
	httpBlock = `
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: ca.pem, key_file: ca-key.pem}
`
	tokenVault = `
vault:
  address: https://vault.internal:8200
  auth: {method: token, token_file: vault-token}
`
)

// pg returns a postgres list with one valid entry plus extra lines (indented
// four spaces) appended to it.
func pg(extra ...string) string {
	s := `
postgres:
  - name: appdb
    listen: 127.0.0.1:6432
    upstream: db.internal:5432
    credentials: app
`
	for _, e := range extra {
		s += "    " + e + "\n"
	}
	return s
}

// route returns an http block with one route made of the given lines.
func route(lines ...string) string {
	return httpBlock + "  routes:\n    - " + strings.Join(lines, "\n      ") + "\n"
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name  string
		src   string
		env   map[string]string
		unset []string
		want  []string // each a substring of its own problem line, {dir} the fixture; empty: valid
	}{
		// Whole file.
		{name: "minimal postgres is valid", src: appSecret + pg()},
		{name: "minimal http is valid", src: appSecret + httpBlock},
		{name: "empty document", src: "", want: []string{"postgres: at least one of postgres or http must be configured"}},
		{name: "only secrets", src: appSecret, want: []string{"postgres: at least one of postgres or http must be configured"}},
		{name: "negative shutdown_grace", src: "shutdown_grace: -1s\n" + appSecret + pg(), want: []string{"shutdown_grace: must not be negative"}},

		// Admin and audit.
		{name: "admin listen", src: "admin: {listen: 127.0.0.1:9187}\n" + appSecret + pg()},
		{name: "admin listen missing", src: "admin: {}\n" + appSecret + pg(), want: []string{"admin.listen: required"}},
		{name: "admin listen unix", src: "admin: {listen: unix:/run/x}\n" + appSecret + pg(), want: []string{`admin.listen: "unix:/run/x": unix sockets are only supported for postgres listeners`}},
		{name: "audit stdout", src: "audit: {path: \"-\"}\n" + appSecret + pg()},
		{name: "audit new file", src: "audit: {path: adir/audit.jsonl}\n" + appSecret + pg()},
		{name: "audit missing directory", src: "audit: {path: nodir/audit.jsonl}\n" + appSecret + pg(), want: []string{"audit.path: directory {dir}/nodir: no such file or directory"}},
		{name: "audit path is a directory", src: "audit: {path: adir}\n" + appSecret + pg(), want: []string{"audit.path: {dir}/adir is a directory, not a file"}},

		// Postgres.
		{name: "name missing", src: appSecret + strings.Replace(pg(), "name: appdb", "name: \"\"", 1), want: []string{"postgres[0].name: required"}},
		{name: "name bad characters", src: appSecret + strings.Replace(pg(), "name: appdb", "name: app db/1", 1), want: []string{`postgres[0].name: "app db/1" must match [A-Za-z0-9_.-]+`}},
		{name: "name duplicate", src: appSecret + pg() + `  - {name: appdb, listen: "127.0.0.1:6433", upstream: db, credentials: app}` + "\n",
			want: []string{`postgres[1].name: duplicate name "appdb" (also postgres[0])`}},
		{name: "listen missing", src: appSecret + strings.Replace(pg(), "listen: 127.0.0.1:6432", "database: x", 1), want: []string{"postgres[0].listen: required"}},
		{name: "listen without port", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", "127.0.0.1", 1), want: []string{`postgres[0].listen: "127.0.0.1" must be host:port`}},
		{name: "listen bad port", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", "127.0.0.1:70000", 1), want: []string{`postgres[0].listen: "127.0.0.1:70000" has an invalid port`}},
		{name: "listen bad host", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", "bad host!:5432", 1), want: []string{`postgres[0].listen: "bad host!:5432" has an invalid host`}},
		{name: "listen all interfaces", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", ":6432", 1)},
		{name: "listen unix absolute", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", "unix:/run/credproxy/.s.PGSQL.5432", 1)},
		{name: "listen unix relative", src: appSecret + strings.Replace(pg(), "127.0.0.1:6432", "unix:run/s", 1), want: []string{`postgres[0].listen: "unix:run/s": unix socket path must be absolute`}},
		{name: "listen clash between postgres entries", src: appSecret + pg() + `  - {name: b, listen: "127.0.0.1:6432", upstream: db, credentials: app}` + "\n",
			want: []string{"postgres[1].listen: 127.0.0.1:6432 is already used by postgres[0].listen"}},
		{name: "listen clash unix", src: appSecret + `
postgres:
  - {name: a, listen: "unix:/run/s", upstream: db, credentials: app}
  - {name: b, listen: "unix:/run//s", upstream: db, credentials: app}
`, want: []string{"postgres[1].listen: unix:/run//s is already used by postgres[0].listen"}},
		{name: "listen clash with admin and http", src: "admin: {listen: 127.0.0.1:6432}\n" + appSecret + pg() + strings.Replace(httpBlock, "8118", "6432", 1),
			want: []string{
				"postgres[0].listen: 127.0.0.1:6432 is already used by admin.listen",
				"http.listen: 127.0.0.1:6432 is already used by admin.listen",
			}},
		{name: "port 0 listeners never clash", src: appSecret + `
postgres:
  - {name: a, listen: "127.0.0.1:0", upstream: db, credentials: app}
  - {name: b, listen: "127.0.0.1:0", upstream: db, credentials: app}
`},
		{name: "upstream missing", src: appSecret + strings.Replace(pg(), "upstream: db.internal:5432", "database: d", 1), want: []string{"postgres[0].upstream: required"}},
		{name: "upstream no host", src: appSecret + strings.Replace(pg(), "db.internal:5432", ":5432", 1), want: []string{`postgres[0].upstream: ":5432" has no host`}},
		{name: "upstream port zero", src: appSecret + strings.Replace(pg(), "db.internal:5432", "db:0", 1), want: []string{`postgres[0].upstream: "db:0" has an invalid port`}},
		{name: "upstream port not a number", src: appSecret + strings.Replace(pg(), "db.internal:5432", "db:pg", 1), want: []string{`postgres[0].upstream: "db:pg" has an invalid port`}},
		{name: "upstream ipv6", src: appSecret + strings.Replace(pg(), "db.internal:5432", "\"[::1]:5432\"", 1)},
		{name: "credentials missing", src: appSecret + strings.Replace(pg(), "credentials: app", "database: d", 1), want: []string{"postgres[0].credentials: required"}},
		{name: "credentials unknown", src: appSecret + strings.Replace(pg(), "credentials: app", "credentials: nope", 1), want: []string{`postgres[0].credentials: no secret named "nope" under secrets`}},
		{name: "credentials without password", src: "secrets:\n  app: {static: {username: app}}\n" + pg(), want: []string{`postgres[0].credentials: secret "app" has no password field`}},
		{name: "credentials env fields", src: "secrets:\n  app: {env: {user: HOME}}\n" + pg(), env: map[string]string{"HOME": "/root"},
			want: []string{`secret "app" has no username field`, `secret "app" has no password field`}},

		// Postgres TLS.
		{name: "tls mode bad", src: appSecret + pg("tls: {mode: prefer}"), want: []string{`postgres[0].tls.mode: must be one of disable, require, verify-ca, verify-full, not "prefer"`}},
		{name: "tls verify-ca without ca_file uses system roots", src: appSecret + pg("tls: {mode: verify-ca}")},
		{name: "tls full", src: appSecret + pg("tls: {mode: verify-full, ca_file: db-ca.pem, server_name: db, cert_file: client.pem, key_file: client-key.pem}")},
		{name: "tls ca_file missing", src: appSecret + pg("tls: {ca_file: nope.pem}"), want: []string{"postgres[0].tls.ca_file: open {dir}/nope.pem: no such file or directory"}},
		{name: "tls ca_file directory", src: appSecret + pg("tls: {ca_file: adir}"), want: []string{"postgres[0].tls.ca_file: {dir}/adir is a directory, not a file"}},
		{name: "tls cert without key", src: appSecret + pg("tls: {cert_file: client.pem}"), want: []string{"postgres[0].tls.key_file: required when cert_file is set"}},
		{name: "tls key without cert", src: appSecret + pg("tls: {key_file: client-key.pem}"), want: []string{"postgres[0].tls.cert_file: required when key_file is set"}},
		{name: "client_tls", src: appSecret + pg("client_tls: {cert_file: client.pem, key_file: client-key.pem}")},
		{name: "client_tls empty means none", src: appSecret + pg("client_tls: {cert_file: \"\", key_file: \"\"}")},
		{name: "client_tls cert only", src: appSecret + pg("client_tls: {cert_file: client.pem}"), want: []string{"postgres[0].client_tls.key_file: required when cert_file is set"}},
		{name: "client_tls files missing", src: appSecret + pg("client_tls: {cert_file: a.pem, key_file: b.pem}"),
			want: []string{"postgres[0].client_tls.cert_file: open ", "postgres[0].client_tls.key_file: open "}},
		{name: "client_tls required", src: appSecret + pg("client_tls: {cert_file: client.pem, key_file: client-key.pem, required: true}")},
		{name: "client_tls required without files", src: appSecret + pg("client_tls: {required: true}"),
			want: []string{"postgres[0].client_tls.cert_file: required", "postgres[0].client_tls.key_file: required"}},
		{name: "client_tls required not a boolean", src: appSecret + pg("client_tls: {cert_file: client.pem, key_file: client-key.pem, required: always}"),
			want: []string{"postgres[0].client_tls.required: "}},
		{name: "client_tls required on a unix socket", src: appSecret + strings.Replace(pg("client_tls: {cert_file: client.pem, key_file: client-key.pem, required: true}"), "listen: 127.0.0.1:6432", "listen: unix:/tmp/.s.PGSQL.5432", 1),
			want: []string{"postgres[0].client_tls.required: cannot apply to a unix: listen address"}},
		{name: "allow_replication", src: appSecret + pg("allow_replication: true")},
		{name: "allow_replication not a boolean", src: appSecret + pg("allow_replication: physical"), want: []string{"postgres[0].allow_replication: "}},
		{name: "timeouts zero", src: appSecret + pg("startup_timeout: 0s", "connect_timeout: 0s"),
			want: []string{"postgres[0].startup_timeout: must be greater than 0", "postgres[0].connect_timeout: must be greater than 0"}},

		// Secrets.
		{name: "secret without source", src: "secrets:\n  app: {}\n" + pg(), want: []string{"secrets.app: must set one of static, env or vault"}},
		{name: "secret with two sources", src: "secrets:\n  app: {static: {username: u, password: p}, env: {x: HOME}}\n" + pg(), env: map[string]string{"HOME": "/"},
			want: []string{"secrets.app: sets static and env; only one of static, env or vault is allowed"}},
		{name: "static empty", src: "secrets:\n  app: {static: {}}\n" + pg(), want: []string{"secrets.app.static: must have at least one field", `secret "app" has no username`, `secret "app" has no password`}},
		{name: "static literal password", src: "secrets:\n  app: {static: {username: u, password: \"p$$w\"}}\n" + pg()},
		{name: "static bare _file", src: "secrets:\n  app: {static: {username: u, password: p, _file: app.pw}}\n" + pg(), want: []string{"secrets.app.static._file: missing field name before _file"}},
		{name: "static file missing", src: "secrets:\n  app: {static: {username: u, password_file: gone.pw}}\n" + pg(), want: []string{"secrets.app.static.password_file: open {dir}/gone.pw: no such file or directory"}},
		{name: "static file empty path", src: "secrets:\n  app: {static: {username: u, password_file: \"\"}}\n" + pg(), want: []string{"secrets.app.static.password_file: required"}},
		{name: "static file and value", src: "secrets:\n  app: {static: {username: u, password: p, password_file: app.pw}}\n" + pg(), want: []string{"secrets.app.static.password_file: field password is also set"}},
		{name: "env set", src: "secrets:\n  app: {env: {username: CP_TEST_USER, password: CP_TEST_PW}}\n" + pg(), env: map[string]string{"CP_TEST_USER": "u", "CP_TEST_PW": ""}},
		{name: "env unset", src: "secrets:\n  app-env: {env: {username: CP_TEST_USER, password: PGPASSWORD_APP}}\n" + strings.Replace(pg(), "credentials: app", "credentials: app-env", 1),
			env: map[string]string{"CP_TEST_USER": "u"}, unset: []string{"PGPASSWORD_APP"},
			want: []string{"secrets.app-env.env.password: environment variable PGPASSWORD_APP is not set"}},
		{name: "env bad name", src: "secrets:\n  app: {env: {username: 1USER, password: \"PG-PW\"}}\n" + pg(),
			want: []string{`secrets.app.env.username: "1USER" is not a valid environment variable name`, `secrets.app.env.password: "PG-PW" is not a valid environment variable name`}},
		{name: "env empty", src: "secrets:\n  app: {env: {}}\n" + pg(), want: []string{"secrets.app.env: must have at least one field", "no username field", "no password field"}},
		{name: "vault secret path missing", src: "secrets:\n  app: {vault: {field_map: {username: u, password: p}}}\n" + tokenVault + pg(), want: []string{"secrets.app.vault.path: required"}},
		{name: "vault field_map lacks fields", src: "secrets:\n  app: {vault: {path: database/creds/app, field_map: {user: username}}}\n" + tokenVault + pg(),
			want: []string{`postgres[0].credentials: secret "app" has no username field`, `postgres[0].credentials: secret "app" has no password field`}},

		// Vault.
		{name: "vault token", src: "secrets:\n  app: {vault: {path: database/creds/app}}\n" + tokenVault + pg()},
		{name: "vault block missing", src: "secrets:\n  app: {vault: {path: p}}\n  gh: {vault: {path: q}}\n" + pg(),
			want: []string{`vault: required because secrets "app", "gh" use vault`}},
		{name: "vault address missing", src: "vault: {auth: {method: token, token_file: vault-token}}\n" + appSecret + pg(), want: []string{"vault.address: required"}},
		{name: "vault address not http", src: "vault: {address: \"ftp://v\", auth: {method: token, token_file: vault-token}}\n" + appSecret + pg(),
			want: []string{`vault.address: must be an http:// or https:// URL, not "ftp://v"`}},
		{name: "vault address without host", src: "vault: {address: \"vault:8200\", auth: {method: token, token_file: vault-token}}\n" + appSecret + pg(),
			want: []string{`vault.address: must be an http:// or https:// URL`}},
		{name: "vault ca_file missing", src: "vault: {address: \"https://v\", ca_file: none.pem, auth: {method: token, token_file: vault-token}}\n" + appSecret + pg(),
			want: []string{"vault.ca_file: open "}},
		{name: "vault ca_file", src: "vault: {address: \"https://v\", ca_file: vault-ca.pem, auth: {method: token, token_file: vault-token}}\n" + appSecret + pg()},
		{name: "vault method missing", src: "vault: {address: \"https://v\"}\n" + appSecret + pg(), want: []string{"vault.auth.method: required"}},
		{name: "vault method unknown", src: "vault: {address: \"https://v\", auth: {method: ldap}}\n" + appSecret + pg(),
			want: []string{`vault.auth.method: must be one of token, approle, kubernetes, jwt, not "ldap"`}},
		{name: "vault token from VAULT_TOKEN", src: "vault: {address: \"https://v\", auth: {method: token}}\n" + appSecret + pg(), env: map[string]string{"VAULT_TOKEN": "t"}},
		{name: "vault token nowhere", src: "vault: {address: \"https://v\", auth: {method: token}}\n" + appSecret + pg(), unset: []string{"VAULT_TOKEN"},
			want: []string{"vault.auth.token_file: required when $VAULT_TOKEN is not set"}},
		{name: "vault approle", src: "vault: {address: \"https://v\", auth: {method: approle, role_id_file: role-id, secret_id_file: secret-id}}\n" + appSecret + pg()},
		{name: "vault approle incomplete", src: "vault: {address: \"https://v\", auth: {method: approle}}\n" + appSecret + pg(),
			want: []string{"vault.auth.role_id_file: required", "vault.auth.secret_id_file: required"}},
		{name: "vault kubernetes", src: "vault: {address: \"https://v\", auth: {method: kubernetes, role: app}}\n" + appSecret + pg()},
		{name: "vault kubernetes without role", src: "vault: {address: \"https://v\", auth: {method: kubernetes}}\n" + appSecret + pg(), want: []string{"vault.auth.role: required"}},
		{name: "vault jwt incomplete", src: "vault: {address: \"https://v\", auth: {method: jwt}}\n" + appSecret + pg(),
			want: []string{"vault.auth.role: required", "vault.auth.jwt_file: required"}},

		// HTTP.
		{name: "http listen missing", src: appSecret + "http: {ca: {cert_file: ca.pem, key_file: ca-key.pem}}\n", want: []string{"http.listen: required"}},
		{name: "http listen bad", src: appSecret + strings.Replace(httpBlock, "127.0.0.1:8118", "localhost", 1), want: []string{`http.listen: "localhost" must be host:port`}},
		{name: "http ca missing", src: appSecret + "http: {listen: \"127.0.0.1:8118\"}\n", want: []string{"http.ca.cert_file: required", "http.ca.key_file: required"}},
		{name: "http ca files absent", src: appSecret + strings.Replace(httpBlock, "ca-key.pem", "no-key.pem", 1), want: []string{"http.ca.key_file: open "}},
		{name: "http upstream_ca_file absent", src: appSecret + httpBlock + "  upstream_ca_file: no.pem\n", want: []string{"http.upstream_ca_file: open "}},
		{name: "http default tunnel", src: appSecret + httpBlock + "  default: tunnel\n"},
		{name: "http default bad", src: appSecret + httpBlock + "  default: allow\n", want: []string{`http.default: must be one of deny, tunnel, not "allow"`}},
		{name: "route valid", src: appSecret + route("host: api.example.com", "credentials: app", "inject: {header: {name: Authorization, value: 'Bearer {{ .password }}'}}")},
		{name: "route with port and wildcard", src: appSecret + route("host: '*.example.com:8443'", "credentials: app", "upstream: http", "max_concurrent: 4", "inject: {query: {name: key, value: '{{ .password }}'}}")},
		{name: "route ip host", src: appSecret + route("host: '[::1]:8443'", "credentials: app", "inject: {basic: {username: '{{ .username }}', password: '{{ .password }}'}}")},
		{name: "route host missing", src: appSecret + route("credentials: app", "inject: {basic: {username: u}}"), want: []string{"http.routes[0].host: required"}},
		{name: "route host invalid", src: appSecret + route("host: 'bad host'", "credentials: app", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].host: "bad host" is not a valid host`}},
		{name: "route wildcard inside", src: appSecret + route("host: 'api.*.com'", "credentials: app", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].host: "api.*.com": a wildcard is only allowed as the first label`}},
		{name: "route wildcard alone", src: appSecret + route("host: '*'", "credentials: app", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].host: "*": a wildcard is only allowed as the first label`}},
		{name: "route wildcard without domain", src: appSecret + route("host: '*.'", "credentials: app", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].host: "*.": a wildcard must be followed by a domain`}},
		{name: "route bad port", src: appSecret + route("host: 'api.example.com:0'", "credentials: app", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].host: "api.example.com:0" has an invalid port`}},
		{name: "route duplicate host", src: appSecret + route("host: api.example.com", "credentials: app", "inject: {basic: {username: u}}") + "    - {host: API.example.com, credentials: app, inject: {basic: {username: u}}}\n",
			want: []string{`http.routes[1].host: duplicate route for "API.example.com" (also http.routes[0])`}},
		{name: "route credentials", src: appSecret + route("host: a.example.com", "inject: {basic: {username: u}}") + "    - {host: b.example.com, credentials: nope, inject: {basic: {username: u}}}\n",
			want: []string{"http.routes[0].credentials: required", `http.routes[1].credentials: no secret named "nope"`}},
		{name: "route upstream bad", src: appSecret + route("host: a.example.com", "credentials: app", "upstream: ftp", "inject: {basic: {username: u}}"), want: []string{`http.routes[0].upstream: must be one of https, http, not "ftp"`}},
		{name: "route max_concurrent negative", src: appSecret + route("host: a.example.com", "credentials: app", "max_concurrent: -1", "inject: {basic: {username: u}}"), want: []string{"http.routes[0].max_concurrent: must not be negative"}},
		{name: "inject none", src: appSecret + route("host: a.example.com", "credentials: app"), want: []string{"http.routes[0].inject: must set one of header, basic, query, aws_sigv4"}},
		{name: "inject two", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {basic: {username: u}, query: {name: k, value: v}}"),
			want: []string{"http.routes[0].inject: sets basic and query; exactly one of header, basic, query, aws_sigv4 is allowed"}},
		{name: "inject header incomplete", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {}}"),
			want: []string{"http.routes[0].inject.header.name: required", "http.routes[0].inject.header.value: required"}},
		{name: "inject header bad name", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: 'X Token', value: v}}"),
			want: []string{`http.routes[0].inject.header.name: "X Token" is not a valid header name`}},
		{name: "inject header bad template", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Token, value: '{{ .token '}}"),
			want: []string{"http.routes[0].inject.header.value: invalid template: "}},
		{name: "inject query incomplete and bad template", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {query: {value: '{{ if }}'}}"),
			want: []string{"http.routes[0].inject.query.name: required", "http.routes[0].inject.query.value: invalid template: "}},
		{name: "inject basic without username", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {basic: {password: '{{ .password }}'}}"),
			want: []string{"http.routes[0].inject.basic.username: required"}},
		{name: "inject basic bad password template", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {basic: {username: u, password: '{{ end }}'}}"),
			want: []string{"http.routes[0].inject.basic.password: invalid template: "}},
		{name: "inject aws", src: "secrets:\n  aws: {env: {access_key: CP_AK, secret_key: CP_SK}}\n" + route("host: s3.amazonaws.com", "credentials: aws", "inject: {aws_sigv4: {service: s3, region: us-east-1}}"),
			env: map[string]string{"CP_AK": "a", "CP_SK": "s"}},
		{name: "inject aws incomplete", src: appSecret + route("host: s3.amazonaws.com", "credentials: app", "inject: {aws_sigv4: {}}"),
			want: []string{
				"http.routes[0].inject.aws_sigv4.service: required", "http.routes[0].inject.aws_sigv4.region: required",
				`http.routes[0].credentials: secret "app" has no access_key field`, `http.routes[0].credentials: secret "app" has no secret_key field`,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := fixture(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			for _, k := range tt.unset {
				unsetenv(t, k)
			}
			want := make([]string, len(tt.want))
			for i, w := range tt.want {
				want[i] = strings.ReplaceAll(w, "{dir}", dir)
			}
			_, lines := parseLines(t, dir, tt.src)
			checkLines(t, lines, want)
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	dir := fixture(t)
	unsetenv(t, "CP_MISSING_PW")
	_, lines := parseLines(t, dir, `
shutdown_grace: -5s
secrets:
  app: {env: {username: CP_MISSING_PW, password: CP_MISSING_PW}}
  dyn: {vault: {path: database/creds/app}}
postgres:
  - name: "bad name"
    listen: 127.0.0.1:6432
    upstream: db.internal
    credentials: app
    tls: {mode: verify-everything, cert_file: client.pem}
  - name: second
    listen: 127.0.0.1:6432
    upstream: db:99999
    credentials: ghost
http:
  listen: 127.0.0.1:8118
  default: allow
  routes:
    - {host: "", credentials: dyn, inject: {}}
`)
	checkLines(t, lines, []string{
		"shutdown_grace: must not be negative",
		"secrets.app.env.password: environment variable CP_MISSING_PW is not set",
		"secrets.app.env.username: environment variable CP_MISSING_PW is not set",
		`vault: required because secrets "dyn" use vault`,
		`postgres[0].name: "bad name" must match`,
		"postgres[0].tls.mode: must be one of disable, require, verify-ca, verify-full",
		"postgres[0].tls.key_file: required when cert_file is set",
		"postgres[1].listen: 127.0.0.1:6432 is already used by postgres[0].listen",
		`postgres[1].upstream: "db:99999" has an invalid port`,
		`postgres[1].credentials: no secret named "ghost"`,
		"http.ca.cert_file: required",
		"http.ca.key_file: required",
		"http.default: must be one of deny, tunnel",
		"http.routes[0].host: required",
		"http.routes[0].inject: must set one of header, basic, query, aws_sigv4",
	})
}
