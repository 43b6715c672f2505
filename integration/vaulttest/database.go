package vaulttest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	postgresPlugin = "postgresql-database-plugin"

	// The postgres plugin's defaults.
	defaultPostgresRenewStatement = `ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}';`
	defaultUsernameTemplate       = `{{ printf "v-%s-%s-%s-%s" (.DisplayName | truncate 8) (.RoleName | truncate 8) (random 20) (unix_time) | truncate 63 }}`
	expirationFormat              = "2006-01-02 15:04:05-0700"

	// expirationBuffer is added to VALID UNTIL so that the database
	// credential outlives its lease (path_creds_create.go).
	expirationBuffer = 5 * time.Second
	dbConnectTimeout = 10 * time.Second
)

// database is the database secrets engine with the postgres plugin.
type database struct {
	s       *Server
	mu      sync.Mutex
	configs map[string]*dbConfig
	roles   map[string]*dbRole
	conns   map[string]*pgConn
}

type dbConfig struct {
	pluginName             string
	pluginVersion          string
	connectionDetails      map[string]any // as written, password included
	allowedRoles           []string
	rootRotationStatements []string
	passwordPolicy         string
	verifyConnection       bool
}

type dbRole struct {
	dbName                                  string
	creation, revocation, rollback, renewal []string
	defaultTTL, maxTTL                      time.Duration
}

func newDatabase(s *Server) *database {
	return &database{s: s, configs: map[string]*dbConfig{}, roles: map[string]*dbRole{}, conns: map[string]*pgConn{}}
}

func (db *database) routes() []*route {
	cfg := newRoute(`config/`+nameRegex("name"), map[op]handler{opRead: db.readConfig, opUpdate: db.writeConfig, opDelete: db.deleteConfig})
	cfg.exists = func(r *request) bool {
		db.mu.Lock()
		defer db.mu.Unlock()
		return db.configs[r.vars["name"]] != nil
	}
	role := newRoute(`roles/`+nameRegex("name"), map[op]handler{opRead: db.readRole, opUpdate: db.writeRole, opDelete: db.deleteRole})
	role.exists = func(r *request) bool {
		db.mu.Lock()
		defer db.mu.Unlock()
		return db.roles[r.vars["name"]] != nil
	}
	return []*route{
		newRoute(`config/?`, map[op]handler{opList: db.listConfigs}),
		cfg,
		newRoute(`reset/`+nameRegex("name"), map[op]handler{opUpdate: db.reset}),
		newRoute(`roles/?`, map[op]handler{opList: db.listRoles}),
		role,
		newRoute(`creds/`+nameRegex("name"), map[op]handler{opRead: db.creds}),
	}
}

func (db *database) close() {
	db.mu.Lock()
	conns := db.conns
	db.conns = map[string]*pgConn{}
	db.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (db *database) listConfigs(r *request) (*response, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	return listResponse(sortedKeys(db.configs)), nil
}

func (db *database) listRoles(r *request) (*response, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	return listResponse(sortedKeys(db.roles)), nil
}

// readConfig is connectionReadHandler: the password is never returned and
// a parseable connection_url is redacted.
func (db *database) readConfig(r *request) (*response, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	c := db.configs[r.vars["name"]]
	if c == nil {
		return nil, nil
	}
	details := maps.Clone(c.connectionDetails)
	delete(details, "password")
	delete(details, "private_key")
	if raw, ok := details["connection_url"].(string); ok {
		if u, err := url.Parse(raw); err == nil {
			details["connection_url"] = u.Redacted()
		}
	}
	return &response{data: map[string]any{
		"plugin_name":                        c.pluginName,
		"plugin_version":                     c.pluginVersion,
		"connection_details":                 details,
		"allowed_roles":                      nonNil(c.allowedRoles),
		"root_credentials_rotate_statements": nonNil(c.rootRotationStatements),
		"password_policy":                    c.passwordPolicy,
		"verify_connection":                  c.verifyConnection,
	}}, nil
}

func nonNil(l []string) []string {
	if l == nil {
		return []string{}
	}
	return l
}

// configFields are the request fields the backend keeps for itself; every
// other field goes to the plugin as a connection detail.
var configFields = []string{"name", "plugin_name", "plugin_version", "allowed_roles", "verify_connection",
	"root_rotation_statements", "password_policy", "skip_static_role_import_rotation"}

// writeConfig is connectionWriteHandler: it merges an update into the
// stored config, initializes the plugin (connecting when
// verify_connection) and swaps the connection.
func (db *database) writeConfig(r *request) (*response, error) {
	name := r.vars["name"]
	db.mu.Lock()
	old := db.configs[name]
	db.mu.Unlock()
	c := &dbConfig{verifyConnection: true}
	if old != nil {
		cp := *old
		cp.connectionDetails = maps.Clone(old.connectionDetails)
		c = &cp
	}
	var err error
	if r.data.has("verify_connection") || r.op == opCreate {
		if c.verifyConnection, err = r.data.boolean("verify_connection", true); err != nil {
			return nil, err
		}
	}
	if r.data.has("plugin_name") || r.op == opCreate {
		if c.pluginName, err = r.data.str("plugin_name"); err != nil {
			return nil, err
		}
	}
	if c.pluginName == "" {
		return nil, badRequest("empty plugin name")
	}
	if r.data.has("plugin_version") {
		if c.pluginVersion, err = r.data.str("plugin_version"); err != nil {
			return nil, err
		}
	}
	if r.data.has("allowed_roles") || r.op == opCreate {
		if c.allowedRoles, err = r.data.commaStrings("allowed_roles"); err != nil {
			return nil, err
		}
	}
	if r.data.has("root_rotation_statements") || r.op == opCreate {
		if c.rootRotationStatements, err = r.data.strings("root_rotation_statements"); err != nil {
			return nil, err
		}
	}
	if r.data.has("password_policy") {
		if c.passwordPolicy, err = r.data.str("password_policy"); err != nil {
			return nil, err
		}
	}
	details := map[string]any{}
	for k, v := range r.data {
		if !contains(configFields, k) {
			details[k] = v
		}
	}
	if r.op == opCreate || c.connectionDetails == nil {
		c.connectionDetails = details
	} else {
		maps.Copy(c.connectionDetails, details)
	}

	if c.pluginName != postgresPlugin {
		return nil, badRequest("error creating database object: plugin not found in the catalog: %s", c.pluginName)
	}
	if c.passwordPolicy != "" {
		return nil, badRequest("error creating database object: vaulttest: password policies are not supported")
	}
	conn, err := newPGConn(c.connectionDetails)
	if err == nil && c.verifyConnection {
		err = conn.verify(r.ctx)
	}
	if err != nil {
		conn.close()
		return nil, badRequest("error creating database object: %s", err)
	}

	db.mu.Lock()
	db.configs[name] = c
	prev := db.conns[name]
	db.conns[name] = conn
	db.mu.Unlock()
	if prev != nil {
		prev.close()
	}
	if raw, ok := c.connectionDetails["connection_url"].(string); ok {
		if u, err := url.Parse(raw); err == nil && u.User != nil {
			if _, ok := u.User.Password(); ok {
				return &response{warnings: []string{"Password found in connection_url, use a templated url to enable root rotation and prevent read access to password information."}}, nil
			}
		}
	}
	return nil, nil
}

func (db *database) deleteConfig(r *request) (*response, error) {
	name := r.vars["name"]
	db.mu.Lock()
	delete(db.configs, name)
	conn := db.conns[name]
	delete(db.conns, name)
	db.mu.Unlock()
	if conn != nil {
		conn.close()
	}
	return nil, nil
}

// reset closes the connection; the next use reconnects.
func (db *database) reset(r *request) (*response, error) {
	db.mu.Lock()
	conn := db.conns[r.vars["name"]]
	known := db.configs[r.vars["name"]] != nil
	db.mu.Unlock()
	if !known {
		return nil, fmt.Errorf("failed to find entry for connection with name: %q", r.vars["name"])
	}
	if conn != nil {
		conn.closeConn()
	}
	return nil, nil
}

func (db *database) readRole(r *request) (*response, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	role := db.roles[r.vars["name"]]
	if role == nil {
		return nil, nil
	}
	return &response{data: map[string]any{
		"db_name":               role.dbName,
		"creation_statements":   nonNil(role.creation),
		"revocation_statements": nonNil(role.revocation),
		"rollback_statements":   nonNil(role.rollback),
		"renew_statements":      nonNil(role.renewal),
		"default_ttl":           role.defaultTTL.Seconds(),
		"max_ttl":               role.maxTTL.Seconds(),
		"credential_type":       "password",
	}}, nil
}

// writeRole is pathRoleCreateUpdate for dynamic roles.
func (db *database) writeRole(r *request) (*response, error) {
	name := r.vars["name"]
	db.mu.Lock()
	old := db.roles[name]
	db.mu.Unlock()
	role := &dbRole{}
	if old != nil {
		cp := *old
		role = &cp
	}
	create := r.op == opCreate
	var err error
	if r.data.has("db_name") || create {
		if role.dbName, err = r.data.str("db_name"); err != nil {
			return nil, err
		}
	}
	if role.dbName == "" {
		return nil, badRequest("database name is required")
	}
	if ct, _ := r.data.str("credential_type"); ct != "" && ct != "password" {
		return nil, badRequest("vaulttest: credential_type %q is not supported", ct)
	}
	for _, f := range []struct {
		name string
		dst  *[]string
	}{
		{"creation_statements", &role.creation},
		{"revocation_statements", &role.revocation},
		{"rollback_statements", &role.rollback},
		{"renew_statements", &role.renewal},
	} {
		if r.data.has(f.name) || create {
			if *f.dst, err = r.data.strings(f.name); err != nil {
				return nil, err
			}
		}
	}
	role.revocation = removeEmpty(role.revocation)
	if r.data.has("default_ttl") || create {
		if role.defaultTTL, err = r.data.duration("default_ttl"); err != nil {
			return nil, err
		}
	}
	if r.data.has("max_ttl") || create {
		if role.maxTTL, err = r.data.duration("max_ttl"); err != nil {
			return nil, err
		}
	}
	if role.maxTTL != 0 && role.maxTTL < role.defaultTTL {
		return nil, badRequest("ttl cannot be greater than max_ttl")
	}
	db.mu.Lock()
	db.roles[name] = role
	db.mu.Unlock()
	return nil, nil
}

func removeEmpty(l []string) []string {
	var out []string
	for _, s := range l {
		if strings.TrimSpace(s) != "" {
			out = append(out, s)
		}
	}
	return out
}

func (db *database) deleteRole(r *request) (*response, error) {
	db.mu.Lock()
	delete(db.roles, r.vars["name"])
	db.mu.Unlock()
	return nil, nil
}

// globMatch is go-glob's Glob: "*" matches any run of characters.
func globMatch(pattern, subj string) bool {
	if pattern == "*" {
		return true
	}
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == subj
	}
	if !strings.HasPrefix(subj, parts[0]) {
		return false
	}
	subj = subj[len(parts[0]):]
	for i := 1; i < len(parts)-1; i++ {
		idx := strings.Index(subj, parts[i])
		if idx < 0 {
			return false
		}
		subj = subj[idx+len(parts[i]):]
	}
	return strings.HasSuffix(subj, parts[len(parts)-1])
}

func (db *database) lookup(role string) (*dbRole, *dbConfig, *pgConn) {
	db.mu.Lock()
	defer db.mu.Unlock()
	r := db.roles[role]
	if r == nil {
		return nil, nil, nil
	}
	return r, db.configs[r.dbName], db.conns[r.dbName]
}

// creds is pathCredsCreateRead: a new database user, leased.
func (db *database) creds(r *request) (*response, error) {
	name := r.vars["name"]
	role, cfg, conn := db.lookup(name)
	if role == nil {
		return nil, badRequest("unknown role: %s", name)
	}
	if cfg == nil || conn == nil {
		return nil, fmt.Errorf("failed to find entry for connection with name: %q", role.dbName)
	}
	allowed := contains(cfg.allowedRoles, "*")
	for _, pattern := range cfg.allowedRoles {
		allowed = allowed || globMatch(pattern, name)
	}
	if !allowed {
		return nil, fmt.Errorf("%q is not an allowed role", name)
	}
	ttl, _, err := calculateTTL(db.s.view(r.mount), 0, role.defaultTTL, 0, role.maxTTL, 0, time.Time{})
	if err != nil {
		return nil, err
	}
	expiration := time.Now().Add(ttl).Add(expirationBuffer)
	if len(role.creation) == 0 {
		return nil, errors.New("empty creation statements")
	}
	tmpl, _ := cfg.connectionDetails["username_template"].(string)
	displayName := ""
	if r.token != nil {
		displayName = r.token.displayName
	}
	username, err := generateUsername(tmpl, displayName, name)
	if err != nil {
		return nil, fmt.Errorf("unable to generate username: %w", err)
	}
	password := generatePassword()
	if err := conn.newUser(r.ctx, role.creation, username, password, expiration.Format(expirationFormat)); err != nil {
		return nil, err
	}
	return &response{
		data: map[string]any{"username": username, "password": password},
		secret: &secretSpec{
			ttl:       role.defaultTTL,
			maxTTL:    role.maxTTL,
			renewable: true,
			leaser:    db,
			internal: map[string]any{
				"username":              username,
				"role":                  name,
				"db_name":               role.dbName,
				"revocation_statements": role.revocation,
			},
		},
	}, nil
}

// renewSecret is secretCredsRenew: the user's VALID UNTIL moves to the new
// lease end (plus the buffer), computed as the core will compute the TTL.
func (db *database) renewSecret(ctx context.Context, l *lease, increment time.Duration) (time.Duration, time.Duration, error) {
	username, _ := l.internal["username"].(string)
	roleName, _ := l.internal["role"].(string)
	role, _, conn := db.lookup(roleName)
	if role == nil {
		return 0, 0, fmt.Errorf("could not find role with name: %q", roleName)
	}
	if conn == nil {
		return 0, 0, fmt.Errorf("failed to find entry for connection with name: %q", role.dbName)
	}
	ttl, _, err := calculateTTL(db.s.view(l.mount), increment, role.defaultTTL, 0, role.maxTTL, 0, l.issueTime)
	if err != nil {
		return 0, 0, err
	}
	if ttl > 0 {
		exp := time.Now().Add(ttl).Add(expirationBuffer)
		if err := conn.updateExpiration(ctx, role.renewal, username, exp.Format(expirationFormat)); err != nil {
			return 0, 0, err
		}
	}
	return role.defaultTTL, role.maxTTL, nil
}

// revokeSecret is secretCredsRevoke: the role's revocation statements, or
// those saved at creation when the role is gone, or the plugin's default.
func (db *database) revokeSecret(ctx context.Context, l *lease) error {
	username, _ := l.internal["username"].(string)
	roleName, _ := l.internal["role"].(string)
	db.mu.Lock()
	var dbName string
	var stmts []string
	if role := db.roles[roleName]; role != nil {
		dbName, stmts = role.dbName, role.revocation
	} else {
		dbName, _ = l.internal["db_name"].(string)
		stmts, _ = l.internal["revocation_statements"].([]string)
	}
	conn := db.conns[dbName]
	db.mu.Unlock()
	if conn == nil {
		return fmt.Errorf("failed to find entry for connection with name: %q", dbName)
	}
	return conn.deleteUser(ctx, stmts, username)
}

// generateUsername renders the plugin's username template (Vault's
// sdk/helper/template functions).
func generateUsername(tmpl, displayName, roleName string) (string, error) {
	if tmpl == "" {
		tmpl = defaultUsernameTemplate
	}
	funcs := template.FuncMap{
		"random": func(n int) (string, error) {
			if n <= 0 {
				return "", errors.New("length must be > 0")
			}
			return base62(n), nil
		},
		"truncate": func(maxLen int, s string) (string, error) {
			if maxLen <= 0 {
				return "", errors.New("max length must be > 0")
			}
			if len(s) > maxLen {
				return s[:maxLen], nil
			}
			return s, nil
		},
		"truncate_sha256": func(maxLen int, s string) (string, error) {
			if maxLen <= 8 {
				return "", errors.New("max length must be > 8")
			}
			if len(s) <= maxLen {
				return s, nil
			}
			sum := sha256.Sum256([]byte(s[maxLen-8:]))
			return s[:maxLen-8] + hex.EncodeToString(sum[:])[:8], nil
		},
		"uppercase": strings.ToUpper,
		"lowercase": strings.ToLower,
		"replace":   func(find, repl, s string) string { return strings.ReplaceAll(s, find, repl) },
		"sha256": func(s string) string {
			sum := sha256.Sum256([]byte(s))
			return hex.EncodeToString(sum[:])
		},
		"base64":           func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) },
		"unix_time":        func() string { return strconv.FormatInt(time.Now().Unix(), 10) },
		"unix_time_millis": func() string { return strconv.FormatInt(time.Now().UnixMilli(), 10) },
		"timestamp":        func(format string) string { return time.Now().Format(format) },
		"uuid":             func() (string, error) { return newUUID(), nil },
	}
	t, err := template.New("username").Funcs(funcs).Option("missingkey=error").Parse(tmpl)
	if err != nil {
		return "", fmt.Errorf("unable to parse template: %w", err)
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, map[string]string{"DisplayName": displayName, "RoleName": roleName}); err != nil {
		return "", err
	}
	return buf.String(), nil
}

// generatePassword follows Vault's default password policy: 20 characters
// from letters, digits and "-", with at least one of each kind.
func generatePassword() string {
	const (
		lower  = "abcdefghijklmnopqrstuvwxyz"
		upper  = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
		digits = "0123456789"
		dash   = "-"
	)
	for {
		p := randomString(20, lower+upper+digits+dash)
		if strings.ContainsAny(p, lower) && strings.ContainsAny(p, upper) &&
			strings.ContainsAny(p, digits) && strings.Contains(p, dash) {
			return p
		}
	}
}

// queryHelper is dbutil.QueryHelper: {{key}} replaced by value, no escaping.
func queryHelper(tpl string, data map[string]string) string {
	for k, v := range data {
		tpl = strings.ReplaceAll(tpl, "{{"+k+"}}", v)
	}
	return tpl
}

// quoteIdentifier is pq.QuoteIdentifier.
func quoteIdentifier(name string) string {
	if i := strings.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

var (
	postgresEndStatement = regexp.MustCompile(`\bEND\b`)
	doubleQuotedPhrases  = regexp.MustCompile(`(".*?")`)
	singleQuotedPhrases  = regexp.MustCompile(`('.*?')`)
)

// containsMultilineStatement is the plugin's guess whether a statement is
// a block (… END) that must not be split on semicolons. It keeps the
// plugin's quirk of removing only the last quoted literal.
func containsMultilineStatement(stmt string) bool {
	var literals []string
	for _, re := range []*regexp.Regexp{doubleQuotedPhrases, singleQuotedPhrases} {
		literals = append(literals, re.FindAllString(stmt, -1)...)
	}
	without := stmt
	for _, lit := range literals {
		without = strings.ReplaceAll(stmt, lit, "")
	}
	return postgresEndStatement.MatchString(without)
}

// pgConn is the plugin's connection to one database, used one operation at
// a time as the plugin's SQLConnectionProducer does.
type pgConn struct {
	mu   sync.Mutex
	cfg  *pgx.ConnConfig
	conn *pgx.Conn
}

// newPGConn renders connection_url with the escaped username and password,
// as connutil.SQLConnectionProducer.Init does, and parses it.
func newPGConn(details map[string]any) (*pgConn, error) {
	d := fields(details)
	connURL, err := d.str("connection_url")
	if err != nil {
		return nil, err
	}
	if connURL == "" {
		return nil, errors.New("connection_url cannot be empty")
	}
	username, _ := d.str("username")
	password, _ := d.str("password")
	noEscape, _ := d.boolean("disable_escaping", false)
	if !noEscape {
		username, password = url.PathEscape(username), url.PathEscape(password)
	}
	connURL = queryHelper(connURL, map[string]string{"username": username, "password": password})
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, fmt.Errorf("error parsing connection_url: %w", err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = dbConnectTimeout
	}
	return &pgConn{cfg: cfg}, nil
}

// verify connects and pings, as Init does with verify_connection.
func (c *pgConn) verify(ctx context.Context) error {
	return c.with(ctx, func(conn *pgx.Conn) error {
		if err := conn.Ping(ctx); err != nil {
			return fmt.Errorf("error verifying connection: ping failed: %w", err)
		}
		return nil
	})
}

func (c *pgConn) with(ctx context.Context, fn func(*pgx.Conn) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil || c.conn.IsClosed() {
		conn, err := pgx.ConnectConfig(ctx, c.cfg.Copy())
		if err != nil {
			return fmt.Errorf("error verifying connection: %w", err)
		}
		c.conn = conn
	}
	err := fn(c.conn)
	if err != nil && c.conn.IsClosed() {
		c.conn = nil
	}
	return err
}

// closeConn drops the connection; the next operation reconnects.
func (c *pgConn) closeConn() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c.conn.Close(ctx)
		cancel()
		c.conn = nil
	}
}

func (c *pgConn) close() { c.closeConn() }

// execStatements runs statements in one transaction, each split on ";"
// and rendered with vars, unless it looks like a block (create only).
func execStatements(ctx context.Context, conn *pgx.Conn, stmts []string, vars map[string]string, blocks bool) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("unable to start transaction: %w", err)
	}
	defer tx.Rollback(ctx)
	for _, stmt := range stmts {
		if blocks && containsMultilineStatement(stmt) {
			if _, err := tx.Exec(ctx, queryHelper(stmt, vars)); err != nil {
				return fmt.Errorf("failed to execute query: %w", err)
			}
			continue
		}
		for _, q := range parseArbitraryStringSlice(stmt, ";") {
			q = strings.TrimSpace(q)
			if q == "" {
				continue
			}
			if _, err := tx.Exec(ctx, queryHelper(q, vars)); err != nil {
				return fmt.Errorf("failed to execute query: %w", err)
			}
		}
	}
	return tx.Commit(ctx)
}

// newUser is the plugin's NewUser.
func (c *pgConn) newUser(ctx context.Context, stmts []string, username, password, expiration string) error {
	return c.with(ctx, func(conn *pgx.Conn) error {
		return execStatements(ctx, conn, stmts, map[string]string{
			"name": username, "username": username, "password": password, "expiration": expiration,
		}, true)
	})
}

// updateExpiration is the plugin's changeUserExpiration.
func (c *pgConn) updateExpiration(ctx context.Context, stmts []string, username, expiration string) error {
	if len(stmts) == 0 {
		stmts = []string{defaultPostgresRenewStatement}
	}
	return c.with(ctx, func(conn *pgx.Conn) error {
		return execStatements(ctx, conn, stmts, map[string]string{
			"name": username, "username": username, "expiration": expiration,
		}, false)
	})
}

// deleteUser is the plugin's DeleteUser: custom statements in a
// transaction, or the default revocation.
func (c *pgConn) deleteUser(ctx context.Context, stmts []string, username string) error {
	return c.with(ctx, func(conn *pgx.Conn) error {
		if len(stmts) > 0 {
			return execStatements(ctx, conn, stmts, map[string]string{"name": username, "username": username}, false)
		}
		return defaultDeleteUser(ctx, conn, username)
	})
}

// defaultDeleteUser is the plugin's defaultDeleteUser: revoke what can be
// revoked (not stopping at errors), then DROP ROLE.
func defaultDeleteUser(ctx context.Context, conn *pgx.Conn, username string) error {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT exists (SELECT rolname FROM pg_roles WHERE rolname=$1);", username).Scan(&exists); err != nil {
		return err
	}
	if !exists {
		return nil
	}
	rows, err := conn.Query(ctx, "SELECT DISTINCT table_schema FROM information_schema.role_column_grants WHERE grantee=$1;", username)
	if err != nil {
		return err
	}
	user := quoteIdentifier(username)
	var stmts []string
	for rows.Next() {
		var schema string
		if rows.Scan(&schema) != nil {
			continue
		}
		stmts = append(stmts,
			fmt.Sprintf(`REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA %s FROM %s;`, quoteIdentifier(schema), user),
			fmt.Sprintf(`REVOKE USAGE ON SCHEMA %s FROM %s;`, quoteIdentifier(schema), user))
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("could not generate revocation statements for all rows: %w", err)
	}
	stmts = append(stmts,
		fmt.Sprintf(`REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM %s;`, user),
		fmt.Sprintf(`REVOKE ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public FROM %s;`, user),
		fmt.Sprintf(`REVOKE USAGE ON SCHEMA public FROM %s;`, user))
	var dbname string
	if err := conn.QueryRow(ctx, "SELECT current_database();").Scan(&dbname); err != nil {
		return err
	}
	stmts = append(stmts, fmt.Sprintf(`REVOKE CONNECT ON DATABASE %s FROM %s;`, quoteIdentifier(dbname), user))
	var lastErr error
	for _, q := range stmts {
		if _, err := conn.Exec(ctx, q); err != nil {
			lastErr = err
		}
	}
	if lastErr != nil {
		return fmt.Errorf("could not perform all revocation statements: %w", lastErr)
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf(`DROP ROLE IF EXISTS %s;`, user)); err != nil {
		return err
	}
	return nil
}
