package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

var (
	tlsModes     = []string{"disable", "require", "verify-ca", "verify-full"}
	authMethods  = []string{"token", "approle", "kubernetes", "jwt"}
	httpDefaults = []string{"deny", "tunnel"}
	upstreams    = []string{"https", "http"}
	postgresName = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
)

// validator collects every problem rather than stopping at the first.
type validator struct {
	errs     Errors
	warnings []*FieldError
	// skip holds key paths that already failed to decode; a follow-on
	// complaint about them or their children ("required") would be noise.
	skip   map[string]bool
	lookup func(string) (string, bool)
}

func (v *validator) add(path, format string, args ...any) {
	for p := path; p != ""; p = parentPath(p) {
		if v.skip[p] {
			return
		}
	}
	v.errs = append(v.errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

// warn records something credproxy accepts but an operator should see.
func (v *validator) warn(path, format string, args ...any) {
	v.warnings = append(v.warnings, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

// parentPath drops the last element of a key path: a.b[0].c -> a.b[0] -> a.b.
func parentPath(p string) string {
	if i := strings.LastIndexAny(p, ".["); i >= 0 {
		return p[:i]
	}
	return ""
}

func (v *validator) required(path, val string) bool {
	if val == "" {
		v.add(path, "required")
		return false
	}
	return true
}

func (v *validator) oneOf(path, val string, allowed []string) {
	if !slices.Contains(allowed, val) {
		v.add(path, "must be one of %s, not %q", strings.Join(allowed, ", "), val)
	}
}

// readable checks that a file exists, is not a directory and can be opened.
func (v *validator) readable(path, file string) {
	f, err := os.Open(file)
	if err != nil {
		v.add(path, "%v", err)
		return
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		v.add(path, "%v", err)
	} else if fi.IsDir() {
		v.add(path, "%s is a directory, not a file", file)
	}
}

// optionalFile checks a file only when one is named.
func (v *validator) optionalFile(path, file string) {
	if file != "" {
		v.readable(path, file)
	}
}

// listeners detects two listeners on the same address.
type listeners map[string]string // normalized address -> key path

func (l listeners) claim(v *validator, path, addr string) {
	key := strings.ToLower(addr)
	if strings.HasPrefix(addr, "unix:") {
		key = "unix:" + filepath.Clean(addr[len("unix:"):])
	} else if _, port, err := net.SplitHostPort(addr); err != nil || port == "0" {
		return // invalid (reported elsewhere) or ephemeral: never a clash
	}
	if prev, ok := l[key]; ok {
		v.add(path, "%s is already used by %s", addr, prev)
		return
	}
	l[key] = path
}

func (c *Config) validate(v *validator) {
	if c.ShutdownGrace < 0 {
		v.add("shutdown_grace", "must not be negative")
	}
	if len(c.Postgres) == 0 && c.HTTP == nil {
		v.add("postgres", "at least one of postgres or http must be configured")
	}

	ls := listeners{}
	if c.Admin != nil && v.required("admin.listen", c.Admin.Listen) {
		if msg := checkTCPListen(c.Admin.Listen); msg != "" {
			v.add("admin.listen", "%s", msg)
		} else {
			ls.claim(v, "admin.listen", c.Admin.Listen)
		}
	}
	c.validateAudit(v)
	c.validateSecrets(v)
	c.validateVault(v)
	for i := range c.Postgres {
		c.validatePostgres(v, ls, i)
	}
	if c.HTTP != nil {
		c.validateHTTP(v, ls)
	}
	c.validateWorkloads(v)
}

func (c *Config) validateAudit(v *validator) {
	p := c.Audit.Path
	if p == "" || p == "-" {
		return
	}
	if fi, err := os.Stat(p); err == nil && fi.IsDir() {
		v.add("audit.path", "%s is a directory, not a file", p)
		return
	}
	dir := filepath.Dir(p)
	if fi, err := os.Stat(dir); err != nil {
		v.add("audit.path", "directory %s: %v", dir, unwrapPathErr(err))
	} else if !fi.IsDir() {
		v.add("audit.path", "%s is not a directory", dir)
	}
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

func (c *Config) validateSecrets(v *validator) {
	for _, name := range sortedKeys(c.Secrets) {
		s := c.Secrets[name]
		path := keyPath("secrets", name)
		if name == "" {
			v.add("secrets", "a secret has an empty name")
		}
		var kinds []string
		if s.Static != nil {
			kinds = append(kinds, "static")
		}
		if s.Env != nil {
			kinds = append(kinds, "env")
		}
		if s.Vault != nil {
			kinds = append(kinds, "vault")
		}
		switch len(kinds) {
		case 0:
			v.add(path, "must set one of static, env or vault")
		case 1:
		default:
			v.add(path, "sets %s; only one of static, env or vault is allowed", strings.Join(kinds, " and "))
		}

		if s.Static != nil {
			if len(s.Static) == 0 {
				v.add(path+".static", "must have at least one field")
			}
			for _, field := range sortedKeys(s.Static) {
				fpath := keyPath(path+".static", field)
				val := s.Static[field]
				base, isFile := strings.CutSuffix(field, "_file")
				switch {
				case field == "":
					v.add(fpath, "field names must not be empty")
				case isFile && base == "":
					v.add(fpath, "missing field name before _file")
				case isFile:
					if _, dup := s.Static[base]; dup {
						v.add(fpath, "field %s is also set; use one or the other", base)
					}
					if v.required(fpath, val) {
						v.readable(fpath, val)
					}
				}
			}
		}
		if s.Env != nil {
			if len(s.Env) == 0 {
				v.add(path+".env", "must have at least one field")
			}
			for _, field := range sortedKeys(s.Env) {
				fpath := keyPath(path+".env", field)
				name := s.Env[field]
				switch {
				case field == "":
					v.add(fpath, "field names must not be empty")
				case name == "":
					v.add(fpath, "required")
				case !validEnvName(name):
					v.add(fpath, "%q is not a valid environment variable name", name)
				default:
					// The env source reads these once at start; catching a
					// missing one here beats a failed session later.
					if _, ok := v.lookup(name); !ok {
						v.add(fpath, "environment variable %s is not set", name)
					}
				}
			}
		}
		if s.Vault != nil {
			v.required(path+".vault.path", s.Vault.Path)
			if kv := s.Vault.KVVersion; kv != 0 && kv != 1 && kv != 2 {
				v.add(path+".vault.kv_version", "must be 1 or 2 (or omitted to probe the mount)")
			}
			if s.Vault.RefreshInterval <= 0 {
				v.add(path+".vault.refresh_interval", "must be greater than 0")
			}
			for _, k := range sortedKeys(s.Vault.FieldMap) {
				if k == "" || s.Vault.FieldMap[k] == "" {
					v.add(keyPath(path+".vault.field_map", k), "field names must not be empty")
				}
			}
		}
	}
}

func (c *Config) validateVault(v *validator) {
	var users []string
	for _, name := range sortedKeys(c.Secrets) {
		if c.Secrets[name].Vault != nil {
			users = append(users, strconv.Quote(name))
		}
	}
	vc := c.Vault
	if vc == nil {
		if len(users) > 0 {
			v.add("vault", "required because secrets %s use vault", strings.Join(users, ", "))
		}
		return
	}
	if v.required("vault.address", vc.Address) {
		u, err := url.Parse(vc.Address)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.add("vault.address", "must be an http:// or https:// URL, not %q", vc.Address)
		}
	}
	v.optionalFile("vault.ca_file", vc.CAFile)
	if vc.RequestTimeout <= 0 {
		v.add("vault.request_timeout", "must be greater than 0")
	}

	a := vc.Auth
	if a.Method == "" && c.Workloads != nil {
		return // credproxy logs in as each workload (workloads.rules[].vault_auth), never as itself
	}
	if !v.required("vault.auth.method", a.Method) {
		return
	}
	switch a.Method {
	case "token":
		if a.TokenFile == "" {
			if _, ok := v.lookup("VAULT_TOKEN"); !ok {
				v.add("vault.auth.token_file", "required when $VAULT_TOKEN is not set")
			}
		}
	case "approle":
		v.required("vault.auth.role_id_file", a.RoleIDFile)
		v.required("vault.auth.secret_id_file", a.SecretIDFile)
	case "kubernetes":
		v.required("vault.auth.role", a.Role)
	case "jwt":
		v.required("vault.auth.role", a.Role)
		v.required("vault.auth.jwt_file", a.JWTFile)
	default:
		v.oneOf("vault.auth.method", a.Method, authMethods)
	}
	// Auth files are read when credproxy logs in and may be written or
	// rotated by another agent (Kubernetes, Vault Agent), so their existence
	// is not checked here.
}

func (c *Config) validatePostgres(v *validator, ls listeners, i int) {
	if m := c.Postgres[i].SocketMode; m != "" {
		path := fmt.Sprintf("postgres[%d].socket_mode", i)
		if mode, err := strconv.ParseUint(m, 8, 32); err != nil || mode > 0o777 {
			v.add(path, "must be an octal file mode such as \"0660\", not %q", m)
		} else if !strings.HasPrefix(c.Postgres[i].Listen, "unix:") && c.Workloads == nil {
			v.add(path, "applies only to a unix: listen address")
		}
	}
	p := c.Postgres[i]
	path := fmt.Sprintf("postgres[%d]", i)

	if v.required(path+".name", p.Name) {
		if !postgresName.MatchString(p.Name) {
			v.add(path+".name", "%q must match [A-Za-z0-9_.-]+", p.Name)
		}
		for j := range i {
			if c.Postgres[j].Name == p.Name {
				v.add(path+".name", "duplicate name %q (also postgres[%d])", p.Name, j)
				break
			}
		}
	}
	if c.Workloads != nil {
		if msg := checkWorkloadListen(p.Listen); msg != "" {
			v.add(path+".listen", "%s", msg)
		} else {
			ls.claim(v, path+".listen", p.Listen)
		}
	} else if v.required(path+".listen", p.Listen) {
		if msg := checkListen(p.Listen); msg != "" {
			v.add(path+".listen", "%s", msg)
		} else {
			ls.claim(v, path+".listen", p.Listen)
		}
	}
	if v.required(path+".upstream", p.Upstream) {
		if msg := checkHostPort(p.Upstream, false); msg != "" {
			v.add(path+".upstream", "%s", msg)
		}
	}
	c.checkCredentials(v, path+".credentials", p.Credentials, "username", "password")

	tp := path + ".tls"
	v.oneOf(tp+".mode", p.TLS.Mode, tlsModes)
	v.optionalFile(tp+".ca_file", p.TLS.CAFile)
	v.pairedFiles(tp, p.TLS.CertFile, p.TLS.KeyFile, false)

	if p.ClientTLS != nil {
		v.pairedFiles(path+".client_tls", p.ClientTLS.CertFile, p.ClientTLS.KeyFile, true)
		if p.ClientTLS.Required && strings.HasPrefix(p.Listen, "unix:") {
			// libpq never asks for TLS over a unix socket (nor does
			// PostgreSQL offer it there): every app would be refused.
			v.add(path+".client_tls.required", "cannot apply to a unix: listen address (clients never use TLS over a unix socket)")
		}
	}
	if p.StartupTimeout <= 0 {
		v.add(path+".startup_timeout", "must be greater than 0")
	}
	if p.ConnectTimeout <= 0 {
		v.add(path+".connect_timeout", "must be greater than 0")
	}
	v.notNegative(path+".max_sessions", p.MaxSessions)
	v.notNegative(path+".max_handshakes", p.MaxHandshakes)
	if p.Rotation.MigrateBefore < 0 {
		v.add(path+".rotation.migrate_before", "must not be negative")
	}
	if pl := p.Pool; pl != nil {
		pp := path + ".pool"
		if pl.MaxServerConnections <= 0 {
			v.add(pp+".max_server_connections", "must be greater than 0")
		}
		if pl.IdleTimeout <= 0 {
			v.add(pp+".idle_timeout", "must be greater than 0")
		}
		if pl.MaxLifetime <= 0 {
			v.add(pp+".max_lifetime", "must be greater than 0")
		}
		if pl.WaitTimeout <= 0 {
			v.add(pp+".wait_timeout", "must be greater than 0")
		}
		if msg := checkResetQuery(pl.ResetQuery); msg != "" {
			v.add(pp+".reset_query", "%s", msg)
		} else if !strings.Contains(strings.ToUpper(pl.ResetQuery), "DISCARD ALL") {
			v.warn(pp+".reset_query", "%q does not run DISCARD ALL: what it leaves (settings, prepared statements, "+
				"temporary tables, LISTEN, advisory locks) is seen by the next app that gets the connection", pl.ResetQuery)
		}
	}
}

// checkResetQuery checks pool.reset_query: one statement of text that
// the pool runs with the simple protocol when a session ends.
func checkResetQuery(q string) string {
	switch {
	case strings.TrimSpace(q) == "":
		return `must not be empty (absent: "DISCARD ALL")`
	case strings.ContainsRune(q, 0):
		return "must not contain a NUL byte"
	case len(q) > 8<<10:
		return "must be at most 8 KiB"
	}
	return ""
}

// notNegative checks a limit where 0 means the default.
func (v *validator) notNegative(path string, n int) {
	if n < 0 {
		v.add(path, "must not be negative (0 or absent: the default)")
	}
}

// pairedFiles checks a cert_file/key_file pair: both or (unless required) neither.
func (v *validator) pairedFiles(path, cert, key string, required bool) {
	switch {
	case cert == "" && key == "" && !required:
		return
	case cert == "" && key == "":
		v.add(path+".cert_file", "required")
		v.add(path+".key_file", "required")
		return
	case cert == "":
		v.add(path+".cert_file", "required when key_file is set")
	case key == "":
		v.add(path+".key_file", "required when cert_file is set")
	}
	v.optionalFile(path+".cert_file", cert)
	v.optionalFile(path+".key_file", key)
}

// checkCredentials checks that name is a secret and, where the secret's
// fields are known before start, that it has the fields needed.
func (c *Config) checkCredentials(v *validator, path, name string, fields ...string) {
	if !v.required(path, name) {
		return
	}
	if _, ok := c.Secrets[name]; !ok {
		v.add(path, "no secret named %q under secrets", name)
		return
	}
	have := c.secretFields(name)
	if have == nil {
		return
	}
	for _, f := range fields {
		if !have[f] {
			v.add(path, "secret %q has no %s field", name, f)
		}
	}
}

// secretFields returns the fields secret name yields, where they are known
// before start: static (X_file yields X), env (its keys) and vault with a
// field_map (only the mapped fields are kept). It returns nil when they
// are not known: a vault secret without field_map, a missing secret, or
// one with several sources (reported elsewhere).
func (c *Config) secretFields(name string) map[string]bool {
	s, ok := c.Secrets[name]
	if !ok {
		return nil
	}
	var keys []string
	switch {
	case s.Static != nil && s.Env == nil && s.Vault == nil:
		for k := range s.Static {
			keys = append(keys, strings.TrimSuffix(k, "_file"))
		}
	case s.Env != nil && s.Static == nil && s.Vault == nil:
		for k := range s.Env {
			keys = append(keys, k)
		}
	case s.Vault != nil && s.Static == nil && s.Env == nil && len(s.Vault.FieldMap) > 0:
		for k := range s.Vault.FieldMap {
			keys = append(keys, k)
		}
	default:
		return nil
	}
	have := make(map[string]bool, len(keys))
	for _, k := range keys {
		have[k] = true
	}
	return have
}

func (c *Config) validateHTTP(v *validator, ls listeners) {
	h := c.HTTP
	if v.required("http.listen", h.Listen) {
		if msg := checkTCPListen(h.Listen); msg != "" {
			v.add("http.listen", "%s", msg)
		} else {
			ls.claim(v, "http.listen", h.Listen)
			v.checkHTTPListen(h)
		}
	}
	if v.required("http.ca.cert_file", h.CA.CertFile) {
		v.readable("http.ca.cert_file", h.CA.CertFile)
	}
	if v.required("http.ca.key_file", h.CA.KeyFile) {
		v.readable("http.ca.key_file", h.CA.KeyFile)
		v.checkPrivateKey("http.ca.key_file", h.CA.KeyFile)
	}
	v.optionalFile("http.upstream_ca_file", h.UpstreamCAFile)
	v.oneOf("http.default", h.Default, httpDefaults)
	for i, d := range h.TunnelDeny {
		if _, err := ParseDestination(d); err != nil {
			v.add(fmt.Sprintf("http.tunnel_deny[%d]", i), "%v", err)
		}
	}
	v.notNegative("http.max_connections", h.MaxConnections)
	if h.IdleTimeout <= 0 {
		v.add("http.idle_timeout", "must be greater than 0")
	}
	if h.BodyReadTimeout <= 0 {
		v.add("http.body_read_timeout", "must be greater than 0")
	}

	claims := routeClaims{}
	for i, r := range h.Routes {
		path := fmt.Sprintf("http.routes[%d]", i)
		if v.required(path+".host", r.Host) {
			if msg := checkRouteHost(r.Host); msg != "" {
				v.add(path+".host", "%s", msg)
			} else {
				claims.claim(v, path+".host", i, r.Host)
				v.checkRouteDestination(path+".host", r.Host)
			}
		}
		var needs []string
		if r.Inject.AWSSigV4 != nil {
			needs = []string{"access_key", "secret_key"}
		}
		c.checkCredentials(v, path+".credentials", r.Credentials, needs...)
		v.oneOf(path+".upstream", r.Upstream, upstreams)
		v.checkCleartext(path+".upstream", r)
		if r.MaxConcurrent < 0 {
			v.add(path+".max_concurrent", "must not be negative")
		}
		if r.MaxUpstreamConnections < 0 {
			v.add(path+".max_upstream_connections", "must not be negative")
		}
		v.validateInject(path+".inject", r.Inject, r.Credentials, c.secretFields(r.Credentials))
	}
}

// validateInject checks a route's inject block; its templates read the
// fields of secret, which are listed in fields when known (else nil).
func (v *validator) validateInject(path string, in Inject, secret string, fields map[string]bool) {
	var set []string
	if in.Header != nil {
		set = append(set, "header")
		hp := path + ".header"
		if v.required(hp+".name", in.Header.Name) && !isToken(in.Header.Name) {
			v.add(hp+".name", "%q is not a valid header name", in.Header.Name)
		}
		if v.required(hp+".value", in.Header.Value) {
			v.template(hp+".value", in.Header.Value, secret, fields)
		}
	}
	if in.Basic != nil {
		set = append(set, "basic")
		bp := path + ".basic"
		// The password may be empty: some APIs take a key as the username alone.
		if v.required(bp+".username", in.Basic.Username) {
			v.template(bp+".username", in.Basic.Username, secret, fields)
		}
		v.template(bp+".password", in.Basic.Password, secret, fields)
	}
	if in.Query != nil {
		set = append(set, "query")
		qp := path + ".query"
		v.required(qp+".name", in.Query.Name)
		if v.required(qp+".value", in.Query.Value) {
			v.template(qp+".value", in.Query.Value, secret, fields)
		}
	}
	if in.AWSSigV4 != nil {
		set = append(set, "aws_sigv4")
		v.required(path+".aws_sigv4.service", in.AWSSigV4.Service)
		v.required(path+".aws_sigv4.region", in.AWSSigV4.Region)
	}
	switch len(set) {
	case 0:
		v.add(path, "must set one of header, basic, query, aws_sigv4")
	case 1:
	default:
		v.add(path, "sets %s; exactly one of header, basic, query, aws_sigv4 is allowed", strings.Join(set, " and "))
	}
}

// checkListen accepts host:port or unix:/absolute/path and returns a problem, or "".
func checkListen(addr string) string {
	if sock, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !filepath.IsAbs(sock) {
			return fmt.Sprintf("%q: unix socket path must be absolute, e.g. unix:/run/credproxy/.s.PGSQL.5432", addr)
		}
		return ""
	}
	return checkHostPort(addr, true)
}

// checkTCPListen accepts host:port for listeners that cannot be unix sockets.
func checkTCPListen(addr string) string {
	if strings.HasPrefix(addr, "unix:") {
		return fmt.Sprintf("%q: unix sockets are only supported for postgres listeners; use host:port", addr)
	}
	return checkHostPort(addr, true)
}

// checkHostPort validates host:port. A listener may omit the host (all
// interfaces) and use port 0 (any free port); an upstream may not.
func checkHostPort(addr string, listen bool) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Sprintf("%q must be host:port", addr)
	}
	if host == "" && !listen {
		return fmt.Sprintf("%q has no host", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 || (n == 0 && !listen) {
		return fmt.Sprintf("%q has an invalid port", addr)
	}
	if host != "" && !validHost(host) {
		return fmt.Sprintf("%q has an invalid host", addr)
	}
	return ""
}

// checkRouteHost accepts an exact host or *.domain, each with an optional
// port. A name may end in one dot, as the proxy matches it.
func checkRouteHost(s string) string {
	host := s
	if h, port, err := net.SplitHostPort(s); err == nil {
		host = h
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Sprintf("%q has an invalid port", s)
		}
	} else if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		host = s[1 : len(s)-1]
	}
	if rest, ok := strings.CutPrefix(host, "*."); ok {
		if rest = strings.TrimSuffix(rest, "."); net.ParseIP(rest) != nil || !validHostname(rest) {
			return fmt.Sprintf("%q: a wildcard must be followed by a domain, e.g. *.example.com", s)
		}
		return ""
	}
	if strings.Contains(host, "*") {
		return fmt.Sprintf("%q: a wildcard is only allowed as the first label, e.g. *.example.com", s)
	}
	if net.ParseIP(host) == nil {
		host = strings.TrimSuffix(host, ".")
	}
	if !validHost(host) {
		return fmt.Sprintf("%q is not a valid host", s)
	}
	return ""
}

func validHost(h string) bool {
	return net.ParseIP(h) != nil || validHostname(h)
}

// validHostname checks DNS label syntax; underscores are tolerated as many
// resolvers do.
func validHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c == '-' || c == '_' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
				return false
			}
		}
	}
	return true
}

// isToken reports whether s is an HTTP token (RFC 9110), i.e. a valid header name.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c > 0x7e || !(c == '!' || c == '#' || c == '$' || c == '%' || c == '&' || c == '\'' ||
			c == '*' || c == '+' || c == '-' || c == '.' || c == '^' || c == '_' || c == '`' ||
			c == '|' || c == '~' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
