package config

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Messages of the policy checks, as printed (key path first).
const (
	nonLoopback = `%s: %q is not a loopback address: the proxy does not authenticate its clients, so anyone who can reach it ` +
		`can send requests with the routes' credentials; listen on 127.0.0.1, or set http.allow_non_loopback: true to accept that`
	metadata = `%s: %q is a cloud instance-metadata or link-local address: a route there would open the metadata service, ` +
		`and this machine's own credentials, to the apps`
	loopbackRoute = `%s: %q is this machine (loopback): the credential goes to whatever process listens on that port, ` +
		`and any local user can bind a free port first`
	ipRoute        = `%s: %q is an IP address: the credential goes to whatever host holds that address; prefer a DNS name`
	suffixWildcard = `%s: %q: %s is a public suffix, so the wildcard matches domains anyone can register; ` +
		`name a registered domain, e.g. *.example.com`
	suffixExact = `%s: %q is a public suffix (a top-level or registry domain), not a host an API is served from; ` +
		`did you mean a name under it?`
	cleartext = `%s: the %s is sent upstream in cleartext: anyone on the network path can read and replay it; ` +
		`use https unless the path is encrypted by other means`
	wholeSecret = `%s: %s uses the whole secret, not one field: it would send every field, the password too; ` +
		`name the field, e.g. {{ .token }} or {{ index . "api-key" }}`
	keyMode = `http.ca.key_file: {dir}/ca-key.pem is mode %s: a private key must be readable by its owner only ` +
		`(chmod 600; 640 is accepted for a root-owned file); whoever can read it can intercept every app that trusts the CA`
)

func msg(format string, args ...any) string { return fmt.Sprintf(format, args...) }

const (
	r0host = "http.routes[0].host"
	r1host = "http.routes[1].host"
	r0up   = "http.routes[0].upstream"
	r0hv   = "http.routes[0].inject.header.value"
)

// hdr is a route line list injecting a header from the app secret.
func hdr(host string, extra ...string) string {
	return route(append([]string{"host: '" + host + "'", "credentials: app", "inject: {header: {name: Authorization, value: 'Bearer {{ .password }}'}}"}, extra...)...)
}

// more appends a route (a flow mapping) to a route() block.
func more(flow string) string { return "    - " + flow + "\n" }

func TestPolicy(t *testing.T) {
	listen := func(addr string, extra ...string) string {
		return appSecret + strings.Replace(httpBlock, "127.0.0.1:8118", "'"+addr+"'", 1) + strings.Join(extra, "")
	}
	tests := []struct {
		name      string
		src       string
		env       map[string]string
		keyMode   fs.FileMode // http.ca.key_file's mode; 0 leaves the fixture's 0600
		wantErrs  []string    // exact lines, {dir} the fixture
		wantWarns []string    // exact lines, also for an invalid config
	}{
		// http.listen
		{name: "listen on every interface", src: listen("0.0.0.0:8118"), wantErrs: []string{msg(nonLoopback, "http.listen", "0.0.0.0:8118")}},
		{name: "listen without host", src: listen(":8118"), wantErrs: []string{msg(nonLoopback, "http.listen", ":8118")}},
		{name: "listen on a host name", src: listen("proxy.internal:8118"), wantErrs: []string{msg(nonLoopback, "http.listen", "proxy.internal:8118")}},
		{name: "listen on a pod IP", src: listen("10.0.0.7:8118"), wantErrs: []string{msg(nonLoopback, "http.listen", "10.0.0.7:8118")}},
		{name: "listen non-loopback opted in", src: listen("0.0.0.0:8118", "  allow_non_loopback: true\n")},
		{name: "listen opt-in from env", src: listen("${CP_HOST}:8118", "  allow_non_loopback: ${CP_ALLOW}\n"), env: map[string]string{"CP_HOST": "10.0.0.7", "CP_ALLOW": "true"}},
		{name: "listen on localhost", src: listen("localhost:8118")},
		{name: "listen on IPv6 loopback", src: listen("[::1]:8118")},
		{name: "listen on 127.0.0.2", src: listen("127.0.0.2:8118")},

		// Public suffixes.
		{name: "wildcard over a TLD", src: appSecret + hdr("*.com"), wantErrs: []string{msg(suffixWildcard, r0host, "*.com", "com")}},
		{name: "wildcard over a private suffix", src: appSecret + hdr("*.github.io"), wantErrs: []string{msg(suffixWildcard, r0host, "*.github.io", "github.io")}},
		{name: "wildcard over a registry domain with port", src: appSecret + hdr("*.co.uk:8443"), wantErrs: []string{msg(suffixWildcard, r0host, "*.co.uk:8443", "co.uk")}},
		{name: "wildcard over a suffix, case and dot", src: appSecret + hdr("*.CO.UK."), wantErrs: []string{msg(suffixWildcard, r0host, "*.CO.UK.", "co.uk")}},
		{name: "wildcard over a bucket suffix", src: appSecret + hdr("*.s3.amazonaws.com"), wantErrs: []string{msg(suffixWildcard, r0host, "*.s3.amazonaws.com", "s3.amazonaws.com")}},
		{name: "wildcard over a PSL wildcard rule", src: appSecret + hdr("*.kawasaki.jp"),
			wantErrs: []string{r0host + `: "*.kawasaki.jp": the names under kawasaki.jp are public suffixes, so the wildcard matches domains anyone can register`}},
		{name: "wildcard over a registered domain", src: appSecret + hdr("*.example.com")},
		{name: "wildcard under a private suffix", src: appSecret + hdr("*.myorg.github.io")},
		{name: "wildcard over an unlisted internal name", src: appSecret + hdr("*.svc.cluster.local")},
		{name: "exact registry domain", src: appSecret + hdr("co.uk"), wantWarns: []string{msg(suffixExact, r0host, "co.uk")}},
		{name: "exact private suffix", src: appSecret + hdr("github.io")},
		{name: "exact bucket endpoint", src: appSecret + hdr("s3.amazonaws.com")},
		{name: "single-label service name", src: appSecret + hdr("billing")},

		// Addresses.
		{name: "metadata address", src: appSecret + hdr("169.254.169.254"), wantErrs: []string{msg(metadata, r0host, "169.254.169.254")}},
		{name: "metadata address with port", src: appSecret + hdr("169.254.169.254:80"), wantErrs: []string{msg(metadata, r0host, "169.254.169.254:80")}},
		{name: "link-local", src: appSecret + hdr("169.254.1.1"), wantErrs: []string{msg(metadata, r0host, "169.254.1.1")}},
		{name: "IPv6 link-local", src: appSecret + hdr("[fe80::1]:443"), wantErrs: []string{msg(metadata, r0host, "[fe80::1]:443")}},
		{name: "AWS IPv6 metadata", src: appSecret + hdr("[fd00:ec2::254]"), wantErrs: []string{msg(metadata, r0host, "[fd00:ec2::254]")}},
		{name: "GCP metadata by name", src: appSecret + hdr("Metadata.Google.Internal."), wantErrs: []string{msg(metadata, r0host, "Metadata.Google.Internal.")}},
		{name: "unspecified address", src: appSecret + hdr("0.0.0.0"), wantErrs: []string{r0host + `: "0.0.0.0" is the unspecified address, not a destination`}},
		{name: "loopback address", src: appSecret + hdr("127.0.0.1:8443"), wantWarns: []string{msg(loopbackRoute, r0host, "127.0.0.1:8443")}},
		{name: "localhost", src: appSecret + hdr("localhost:3000"), wantWarns: []string{msg(loopbackRoute, r0host, "localhost:3000")}},
		{name: "localhost wildcard", src: appSecret + hdr("*.localhost"), wantWarns: []string{msg(loopbackRoute, r0host, "*.localhost")}},
		{name: "private address", src: appSecret + hdr("10.1.2.3"), wantWarns: []string{msg(ipRoute, r0host, "10.1.2.3")}},
		{name: "IPv6 address", src: appSecret + hdr("[2001:db8::1]:8443"), wantWarns: []string{msg(ipRoute, r0host, "[2001:db8::1]:8443")}},

		// Duplicates.
		{name: "same host with default port", src: appSecret + hdr("api.example.com") + more("{host: 'api.example.com:443', credentials: app, inject: {basic: {username: u}}}"),
			wantErrs: []string{r1host + `: duplicate route for "api.example.com:443" (also http.routes[0], "api.example.com": a route without a port matches ports 443 and 80)`}},
		{name: "port 80 before no port", src: appSecret + hdr("api.example.com:80") + more("{host: api.example.com, credentials: app, inject: {basic: {username: u}}}"),
			wantErrs: []string{r1host + `: duplicate route for "api.example.com" (also http.routes[0], "api.example.com:80": a route without a port matches ports 443 and 80)`}},
		{name: "same host, case and trailing dot", src: appSecret + hdr("api.example.com") + more("{host: 'API.Example.COM.', credentials: app, inject: {basic: {username: u}}}"),
			wantErrs: []string{r1host + `: duplicate route for "API.Example.COM." (also http.routes[0])`}},
		{name: "same port, leading zero", src: appSecret + hdr("api.example.com:443") + more("{host: 'api.example.com:0443', credentials: app, inject: {basic: {username: u}}}"),
			wantErrs: []string{r1host + `: duplicate route for "api.example.com:0443" (also http.routes[0])`}},
		{name: "same wildcard", src: appSecret + hdr("*.example.com") + more("{host: '*.EXAMPLE.com.:443', credentials: app, inject: {basic: {username: u}}}"),
			wantErrs: []string{r1host + `: duplicate route for "*.EXAMPLE.com.:443" (also http.routes[0], "*.example.com": a route without a port matches ports 443 and 80)`}},
		{name: "same IPv6 address, two spellings", src: appSecret + hdr("[2001:db8::1]") + more("{host: '[2001:db8:0::1]:443', credentials: app, inject: {basic: {username: u}}}"),
			wantErrs:  []string{r1host + `: duplicate route for "[2001:db8:0::1]:443" (also http.routes[0], "[2001:db8::1]": a route without a port matches ports 443 and 80)`},
			wantWarns: []string{msg(ipRoute, r0host, "[2001:db8::1]"), msg(ipRoute, r1host, "[2001:db8:0::1]:443")}},
		{name: "other port is no duplicate", src: appSecret + hdr("api.example.com") + more("{host: 'api.example.com:8443', credentials: app, inject: {basic: {username: u}}}")},
		{name: "wildcard and exact are no duplicate", src: appSecret + hdr("*.example.com") + more("{host: api.example.com, credentials: app, inject: {basic: {username: u}}}")},

		// Cleartext upstream.
		{name: "header over http", src: appSecret + hdr("api.example.com", "upstream: http"), wantWarns: []string{msg(cleartext, r0up, "header Authorization")}},
		{name: "basic over http", src: appSecret + route("host: api.example.com", "credentials: app", "upstream: http", "inject: {basic: {username: '{{ .username }}', password: '{{ .password }}'}}"),
			wantWarns: []string{msg(cleartext, r0up, "basic auth credential")}},
		{name: "query over http", src: appSecret + route("host: api.example.com", "credentials: app", "upstream: http", "inject: {query: {name: api_key, value: '{{ .password }}'}}"),
			wantWarns: []string{msg(cleartext, r0up, "query parameter api_key")}},
		{name: "sigv4 over http", src: "secrets:\n  aws: {static: {access_key: a, secret_key: s}}\n" + route("host: s3.example.com", "credentials: aws", "upstream: http", "inject: {aws_sigv4: {service: s3, region: us-east-1}}")},
		{name: "header over https", src: appSecret + hdr("api.example.com", "upstream: https")},
		{name: "header over http to loopback", src: appSecret + hdr("127.0.0.1:8080", "upstream: http"), wantWarns: []string{msg(loopbackRoute, r0host, "127.0.0.1:8080")}},

		// Templates.
		{name: "template renders dot", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Key, value: '{{ . }}'}}"),
			wantErrs: []string{msg(wholeSecret, r0hv, "{{.}}")}},
		{name: "template prints dot", src: appSecret + route("host: a.example.com", "credentials: app", `inject: {header: {name: X-Key, value: '{{ printf "%v" . }}'}}`),
			wantErrs: []string{msg(wholeSecret, r0hv, `{{printf "%v" .}}`)}},
		{name: "template ranges over dot", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Key, value: '{{ range . }}{{ . }},{{ end }}'}}"),
			wantErrs: []string{msg(wholeSecret, r0hv, "{{range .}}")}},
		{name: "template renders dollar", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {query: {name: k, value: '{{ $ }}'}}"),
			wantErrs: []string{msg(wholeSecret, "http.routes[0].inject.query.value", "{{$}}")}},
		{name: "template with dollar", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {basic: {username: '{{ with $ }}{{ .username }}{{ end }}'}}"),
			wantErrs: []string{msg(wholeSecret, "http.routes[0].inject.basic.username", "{{with $}}")}},
		{name: "template indexes dot by a field", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {basic: {username: '{{ .username }}', password: '{{ index . .username }}'}}"),
			wantErrs: []string{msg(wholeSecret, "http.routes[0].inject.basic.password", "{{index . .username}}")}},
		{name: "template passes dot to a template", src: appSecret + route("host: a.example.com", "credentials: app", `inject: {header: {name: X-Key, value: '{{ define "t" }}{{ .password }}{{ end }}{{ template "t" . }}'}}`),
			wantErrs: []string{msg(wholeSecret, r0hv, `{{template "t" .}}`)}},
		{name: "template dot twice reported once", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Key, value: '{{ . }}{{ . }}'}}"),
			wantErrs: []string{msg(wholeSecret, r0hv, "{{.}}")}},
		{name: "template field of a field", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Key, value: '{{ .password.raw }}'}}"),
			wantErrs: []string{r0hv + ": .password.raw: the secret's fields are strings, with no fields of their own"}},
		{name: "template field access forms", src: appSecret + route("host: a.example.com", "credentials: app",
			`inject: {header: {name: X-Key, value: '{{ with .password }}{{ . }}{{ end }}:{{ $.username }}:{{ index . "password" }}:{{ .username | printf "%s" }}'}}`)},
		{name: "static secret lacks field", src: appSecret + route("host: a.example.com", "credentials: app", "inject: {header: {name: X-Key, value: '{{ .token }}'}}"),
			wantErrs: []string{r0hv + `: secret "app" has no field "token" (it has password, username)`}},
		{name: "static secret lacks indexed field", src: appSecret + route("host: a.example.com", "credentials: app", `inject: {query: {name: k, value: '{{ index . "api-key" }}'}}`),
			wantErrs: []string{`http.routes[0].inject.query.value: secret "app" has no field "api-key" (it has password, username)`}},
		{name: "static secret has indexed field", src: "secrets:\n  app: {static: {api-key_file: app.pw}}\n" + route("host: a.example.com", "credentials: app", `inject: {query: {name: k, value: '{{ index . "api-key" }}'}}`)},
		{name: "env secret lacks field", src: "secrets:\n  gh: {env: {token: CP_GH_TOKEN}}\n" + route("host: a.example.com", "credentials: gh", "inject: {basic: {username: '{{ .user }}', password: '{{ .token }}'}}"),
			env:      map[string]string{"CP_GH_TOKEN": "t"},
			wantErrs: []string{`http.routes[0].inject.basic.username: secret "gh" has no field "user" (it has token)`}},
		{name: "vault secret fields unknown", src: "secrets:\n  gh: {vault: {path: secret/gh}}\n" + tokenVault + route("host: a.example.com", "credentials: gh", "inject: {header: {name: X-Key, value: '{{ .anything }}'}}")},
		{name: "vault field_map lacks field", src: "secrets:\n  gh: {vault: {path: secret/gh, field_map: {token: pat}}}\n" + tokenVault + route("host: a.example.com", "credentials: gh", "inject: {header: {name: X-Key, value: '{{ .pat }}'}}"),
			wantErrs: []string{r0hv + `: secret "gh" has no field "pat" (it has token)`}},

		// The CA key's permissions.
		{name: "CA key owner-only", src: appSecret + httpBlock, keyMode: 0o400},
		{name: "CA key world-readable", src: appSecret + httpBlock, keyMode: 0o644, wantErrs: []string{msg(keyMode, "0644")}},
		{name: "CA key world-readable only", src: appSecret + httpBlock, keyMode: 0o604, wantErrs: []string{msg(keyMode, "0604")}},
		{name: "CA key group-writable", src: appSecret + httpBlock, keyMode: 0o620, wantErrs: []string{msg(keyMode, "0620")}},

		// Several at once: each is reported, errors stop the config.
		{name: "errors and warnings together", src: listen("0.0.0.0:8118") + "  routes:\n" + more("{host: '*.com', credentials: app, upstream: http, inject: {header: {name: A, value: '{{ . }}'}}}"),
			wantErrs: []string{
				msg(nonLoopback, "http.listen", "0.0.0.0:8118"),
				msg(suffixWildcard, r0host, "*.com", "com"),
				msg(wholeSecret, r0hv, "{{.}}"),
			},
			wantWarns: []string{msg(cleartext, r0up, "header A")}},
		{name: "several warnings", src: appSecret + hdr("10.1.2.3", "upstream: http") + more("{host: co.uk, credentials: app, inject: {basic: {username: u}}}"),
			wantWarns: []string{
				msg(ipRoute, r0host, "10.1.2.3"),
				msg(cleartext, r0up, "header Authorization"),
				msg(suffixExact, r1host, "co.uk"),
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := fixture(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			if tt.keyMode != 0 {
				if err := os.Chmod(filepath.Join(dir, "ca-key.pem"), tt.keyMode); err != nil {
					t.Fatal(err)
				}
			}
			cfg, warnings, err := parseConfig([]byte(tt.src), dir)
			errs := Lines(err)
			want := make([]string, len(tt.wantErrs))
			for i, w := range tt.wantErrs {
				want[i] = strings.ReplaceAll(w, "{dir}", dir)
			}
			if !slices.Equal(errs, want) {
				t.Errorf("errors:\n\t%s\nwant:\n\t%s", strings.Join(errs, "\n\t"), strings.Join(want, "\n\t"))
			}
			if cfg != nil && !slices.Equal(cfg.Warnings(), warnings) {
				t.Errorf("Config.Warnings() = %v, parse returned %v", cfg.Warnings(), warnings)
			}
			var warns []string
			for _, w := range warnings {
				warns = append(warns, w.Error())
			}
			if !slices.Equal(warns, tt.wantWarns) {
				t.Errorf("warnings:\n\t%s\nwant:\n\t%s", strings.Join(warns, "\n\t"), strings.Join(tt.wantWarns, "\n\t"))
			}
		})
	}
}

// The ownership rule cannot be exercised through files without being
// root, so it is tested on its own.
func TestKeyPermProblem(t *testing.T) {
	tests := []struct {
		mode     fs.FileMode
		uid      uint32
		known    bool
		refused  bool
		whyShort string
	}{
		{mode: 0o600, uid: 1000, known: true},
		{mode: 0o400, uid: 1000, known: true},
		{mode: 0o640, uid: 1000, known: true, refused: true, whyShort: "group-readable, not root's"},
		{mode: 0o440, uid: 1000, known: true, refused: true, whyShort: "group-readable, not root's"},
		{mode: 0o640, uid: 0, known: true, whyShort: "root-owned and group-readable: Kubernetes fsGroup"},
		{mode: 0o440, uid: 0, known: true},
		{mode: 0o660, uid: 0, known: true, refused: true, whyShort: "group-writable"},
		{mode: 0o644, uid: 0, known: true, refused: true, whyShort: "world-readable, even root's"},
		{mode: 0o604, uid: 0, known: true, refused: true},
		{mode: 0o640, known: false, refused: true, whyShort: "owner unknown"},
		{mode: 0o600, known: false},
	}
	for _, tt := range tests {
		got := keyPermProblem(tt.mode, tt.uid, tt.known)
		if (got != "") != tt.refused {
			t.Errorf("mode %04o uid %d (known %v, %s): problem %q, want refused=%v", tt.mode, tt.uid, tt.known, tt.whyShort, got, tt.refused)
		}
	}
}

func TestIsPublicSuffix(t *testing.T) {
	tests := []struct {
		name          string
		suffix, icann bool
	}{
		{"com", true, true},
		{"co.uk", true, true},
		{"github.io", true, false},
		{"s3.amazonaws.com", true, false},
		{"foo.kawasaki.jp", true, true}, // by the wildcard rule *.kawasaki.jp
		{"example.com", false, true},
		{"amazonaws.com", false, true},
		{"internal", false, false}, // unlisted: only the default rule
		{"cluster.local", false, false},
		{"localhost", false, false},
	}
	for _, tt := range tests {
		suffix, icann := isPublicSuffix(tt.name)
		if suffix != tt.suffix || (suffix && icann != tt.icann) {
			t.Errorf("isPublicSuffix(%q) = %v, %v; want %v, %v", tt.name, suffix, icann, tt.suffix, tt.icann)
		}
	}
}
