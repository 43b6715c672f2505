package vaulttest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"

	"github.com/credproxy/credproxy/integration/pgtest"
)

// dbHarness is a real PostgreSQL and a server with the database engine
// configured against it.
type dbHarness struct {
	pg     *pgtest.Server
	srv    *Server
	client *vault.Client
}

const createRole = `CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`

func startDB(t *testing.T, opts Options) *dbHarness {
	t.Helper()
	// Dynamic roles log in over TCP too, so every role gets scram-sha-256.
	pg := pgtest.Start(t, pgtest.Options{HBA: []string{"host all all 127.0.0.1/32 scram-sha-256"}})
	srv, client := start(t, opts)
	if err := client.Sys().Mount("database", &vault.MountInput{Type: "database"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, client, "database/config/pg", map[string]any{
		"plugin_name":    "postgresql-database-plugin",
		"connection_url": fmt.Sprintf("postgresql://{{username}}:{{password}}@%s/%s?sslmode=disable", pg.Addr(), pgtest.AppDB),
		"username":       pgtest.Superuser,
		"password":       pg.Password(pgtest.Superuser),
		"allowed_roles":  "app,short,custom,team-*",
	})
	mustWrite(t, client, "database/roles/app", map[string]any{
		"db_name":             "pg",
		"creation_statements": []string{createRole, `GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";`},
		"default_ttl":         "1h",
		"max_ttl":             86400,
	})
	return &dbHarness{pg: pg, srv: srv, client: client}
}

func (h *dbHarness) admin(t *testing.T) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, h.pg.DSN(pgtest.Superuser, pgtest.AppDB))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// validUntil returns the role's VALID UNTIL, and whether the role exists.
func validUntil(t *testing.T, conn *pgx.Conn, role string) (time.Time, bool) {
	t.Helper()
	var until *time.Time
	err := conn.QueryRow(context.Background(), "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", role).Scan(&until)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	if until == nil {
		return time.Time{}, true
	}
	return *until, true
}

func (h *dbHarness) roleGone(t *testing.T, conn *pgx.Conn, role string) {
	t.Helper()
	eventually(t, 10*time.Second, func() error {
		if _, ok := validUntil(t, conn, role); ok {
			return fmt.Errorf("role %s still in pg_roles", role)
		}
		return nil
	})
}

// loginAs connects to the app database as a dynamic user.
func (h *dbHarness) loginAs(user, password string) error {
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=%d dbname=%s sslmode=disable", h.pg.Host, h.pg.Port, pgtest.AppDB))
	if err != nil {
		return err
	}
	cfg.User, cfg.Password = user, password
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

var usernameRE = regexp.MustCompile(`^v-root-app-[0-9A-Za-z]{20}-[0-9]{10}$`)

func TestDatabase(t *testing.T) {
	skipShort(t)
	t.Parallel()
	h := startDB(t, Options{})
	client := h.client

	t.Run("config hides the password", func(t *testing.T) {
		c := mustRead(t, client, "database/config/pg")
		details := c.Data["connection_details"].(map[string]any)
		if _, ok := details["password"]; ok || c.Data["plugin_name"] != "postgresql-database-plugin" || details["username"] != "postgres" ||
			!strings.Contains(details["connection_url"].(string), "{{password}}") {
			t.Errorf("config = %v", c.Data)
		}
		_, err := client.Logical().Write("database/config/bad", map[string]any{
			"plugin_name": "postgresql-database-plugin", "connection_url": "postgresql://nobody:wrong@" + h.pg.Addr() + "/app?sslmode=disable",
		})
		wantAPIError(t, err, http.StatusBadRequest, "error creating database object: error verifying connection")
		_, err = client.Logical().Write("database/config/nourl", map[string]any{"plugin_name": "postgresql-database-plugin"})
		wantAPIError(t, err, http.StatusBadRequest, "connection_url cannot be empty")
	})

	t.Run("creds", func(t *testing.T) {
		admin := h.admin(t) // pgx.Conn is not safe for concurrent use
		s := mustRead(t, client, "database/creds/app")
		user, pass := s.Data["username"].(string), s.Data["password"].(string)
		if !usernameRE.MatchString(user) || len(user) > 63 {
			t.Errorf("username = %q", user)
		}
		if len(pass) != 20 || !strings.Contains(pass, "-") {
			t.Errorf("password = %q", pass)
		}
		if !strings.HasPrefix(s.LeaseID, "database/creds/app/") || s.LeaseDuration != 3600 || !s.Renewable {
			t.Errorf("lease = %q %d %v", s.LeaseID, s.LeaseDuration, s.Renewable)
		}
		until, ok := validUntil(t, admin, user)
		if !ok || until.Before(time.Now().Add(3600*time.Second)) || until.After(time.Now().Add(3610*time.Second)) {
			t.Errorf("VALID UNTIL = %v, %v", until, ok)
		}
		if err := h.loginAs(user, pass); err != nil {
			t.Fatalf("log in as %s: %v", user, err)
		}

		r, err := client.Sys().Renew(s.LeaseID, 120)
		if err != nil || r.LeaseDuration != 120 {
			t.Fatalf("renew = %+v, %v", r, err)
		}
		until, _ = validUntil(t, admin, user)
		if until.After(time.Now().Add(130*time.Second)) || until.Before(time.Now().Add(110*time.Second)) {
			t.Errorf("VALID UNTIL after renew = %v", until)
		}

		if err := client.Sys().Revoke(s.LeaseID); err != nil {
			t.Fatal(err)
		}
		if _, ok := validUntil(t, admin, user); ok {
			t.Error("role still exists after revoke")
		}
		if err := h.loginAs(user, pass); err == nil {
			t.Error("revoked user can log in")
		}
		if len(h.srv.Leases("database/")) != 0 {
			t.Errorf("leases left: %v", h.srv.Leases("database/"))
		}
	})

	t.Run("expiry drops the role", func(t *testing.T) {
		admin := h.admin(t) // pgx.Conn is not safe for concurrent use
		t.Parallel()
		mustWrite(t, client, "database/roles/short", map[string]any{
			"db_name": "pg", "creation_statements": createRole, "default_ttl": 2, "max_ttl": "4s",
		})
		s := mustRead(t, client, "database/creds/short")
		user := s.Data["username"].(string)
		if s.LeaseDuration != 2 {
			t.Errorf("lease_duration = %d", s.LeaseDuration)
		}
		if _, ok := validUntil(t, admin, user); !ok {
			t.Fatal("role not created")
		}
		time.Sleep(time.Second)
		r, err := client.Sys().Renew(s.LeaseID, 60)
		if err != nil {
			t.Fatal(err)
		}
		if r.LeaseDuration > 3 || len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "exceeded the effective max_ttl") {
			t.Errorf("renew past max_ttl = %d, %q", r.LeaseDuration, r.Warnings)
		}
		h.roleGone(t, admin, user)
		_, err = client.Sys().Renew(s.LeaseID, 1)
		wantAPIError(t, err, http.StatusBadRequest, "lease not found")
	})

	t.Run("revoking the token drops its roles", func(t *testing.T) {
		admin := h.admin(t) // pgx.Conn is not safe for concurrent use
		t.Parallel()
		if err := client.Sys().PutPolicy("db", `path "database/creds/app" { capabilities = ["read"] }`); err != nil {
			t.Fatal(err)
		}
		tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"db"}, TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		tc := clientWithToken(t, client, tok.Auth.ClientToken)
		s := mustRead(t, tc, "database/creds/app")
		user := s.Data["username"].(string)
		if !strings.HasPrefix(user, "v-token-app-") {
			t.Errorf("username = %q, want the token's display name", user)
		}
		_, err = tc.Logical().Read("database/roles/app")
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
		if err := tc.Auth().Token().RevokeSelf(""); err != nil {
			t.Fatal(err)
		}
		h.roleGone(t, admin, user)
	})

	t.Run("custom revocation statements", func(t *testing.T) {
		admin := h.admin(t) // pgx.Conn is not safe for concurrent use
		t.Parallel()
		if _, err := admin.Exec(context.Background(), `CREATE TABLE IF NOT EXISTS revoked (name text)`); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, client, "database/roles/custom", map[string]any{
			"db_name":               "pg",
			"creation_statements":   createRole,
			"revocation_statements": `INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";`,
			"renew_statements":      []string{`INSERT INTO revoked VALUES ('renewed {{name}} until {{expiration}}')`},
			"default_ttl":           "1h",
		})
		s := mustRead(t, client, "database/creds/custom")
		user := s.Data["username"].(string)
		if _, err := client.Sys().Renew(s.LeaseID, 0); err != nil {
			t.Fatal(err)
		}
		var note string
		if err := admin.QueryRow(context.Background(), `SELECT name FROM revoked WHERE name LIKE 'renewed %'`).Scan(&note); err != nil ||
			!regexp.MustCompile(`^renewed v-root-custom-\S+ until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4}$`).MatchString(note) {
			t.Errorf("renew statement wrote %q, %v", note, err)
		}
		if until, _ := validUntil(t, admin, user); until.Before(time.Now().Add(time.Hour)) {
			t.Errorf("custom renew statements changed VALID UNTIL to %v", until)
		}
		if err := client.Sys().Revoke(s.LeaseID); err != nil {
			t.Fatal(err)
		}
		var n int
		if err := admin.QueryRow(context.Background(), `SELECT count(*) FROM revoked WHERE name = $1`, user).Scan(&n); err != nil || n != 1 {
			t.Errorf("revocation statements ran %d times, %v", n, err)
		}
		if _, ok := validUntil(t, admin, user); ok {
			t.Error("role not dropped")
		}
	})

	t.Run("role errors", func(t *testing.T) {
		_, err := client.Logical().Read("database/creds/nope")
		wantAPIError(t, err, http.StatusBadRequest, "unknown role: nope")
		mustWrite(t, client, "database/roles/denied", map[string]any{"db_name": "pg", "creation_statements": createRole})
		_, err = client.Logical().Read("database/creds/denied")
		wantAPIError(t, err, http.StatusInternalServerError, `"denied" is not an allowed role`)
		_, err = client.Logical().Write("database/roles/nodb", map[string]any{"creation_statements": createRole})
		wantAPIError(t, err, http.StatusBadRequest, "database name is required")
		mustWrite(t, client, "database/roles/team-a", map[string]any{"db_name": "pg", "creation_statements": createRole, "default_ttl": "1m"})
		s := mustRead(t, client, "database/creds/team-a") // allowed by the team-* glob
		if err := client.Sys().Revoke(s.LeaseID); err != nil {
			t.Fatal(err)
		}
		role := mustRead(t, client, "database/roles/app")
		if role.Data["db_name"] != "pg" || jsonInt(t, role.Data["default_ttl"]) != 3600 || jsonInt(t, role.Data["max_ttl"]) != 86400 ||
			len(role.Data["creation_statements"].([]any)) != 2 {
			t.Errorf("role = %v", role.Data)
		}
	})
}

func TestDatabaseAppRoleAndAudit(t *testing.T) {
	skipShort(t)
	t.Parallel()
	h := startDB(t, Options{})
	client, admin := h.client, h.admin(t)
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	if err := client.Sys().EnableAuditWithOptions("file", &vault.EnableAuditOptions{Type: "file", Options: map[string]string{"file_path": auditPath}}); err != nil {
		t.Fatal(err)
	}
	devices, err := client.Sys().ListAudit()
	if err != nil || devices["file/"] == nil || devices["file/"].Type != "file" {
		t.Fatalf("audit devices = %v, %v", devices, err)
	}

	// credproxy's path: AppRole login, then creds with the login token.
	if err := client.Sys().EnableAuthWithOptions("approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	if err := client.Sys().PutPolicy("credproxy", `path "database/creds/app" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, client, "auth/approle/role/credproxy", map[string]any{"token_policies": "credproxy", "token_ttl": "1h"})
	roleID := mustRead(t, client, "auth/approle/role/credproxy/role-id").Data["role_id"].(string)
	secretID := mustWrite(t, client, "auth/approle/role/credproxy/secret-id", nil).Data["secret_id"].(string)
	login := mustWrite(t, clientWithToken(t, client, ""), "auth/approle/login", map[string]any{"role_id": roleID, "secret_id": secretID})
	token := login.Auth.ClientToken
	tc := clientWithToken(t, client, token)

	var users, passwords []string
	for i := 0; i < 2; i++ {
		s := mustRead(t, tc, "database/creds/app")
		users = append(users, s.Data["username"].(string))
		passwords = append(passwords, s.Data["password"].(string))
		if !strings.HasPrefix(users[i], "v-approle-app-") {
			t.Errorf("username = %q", users[i])
		}
		if err := h.loginAs(users[i], passwords[i]); err != nil {
			t.Errorf("log in as %s: %v", users[i], err)
		}
	}
	if n := h.srv.Count("database/creds/app"); n != 2 {
		t.Errorf("Count = %d, want 2", n)
	}
	_, err = tc.Logical().Read("database/creds/short")
	wantAPIError(t, err, http.StatusForbidden, "permission denied")

	f, err := os.Open(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	content, err := os.ReadFile(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range append(append([]string{token, secretID, h.srv.RootToken(), h.pg.Password(pgtest.Superuser)}, users...), passwords...) {
		if strings.Contains(string(content), secret) {
			t.Errorf("audit log contains a secret in clear: %q", secret)
		}
	}
	hash, err := client.Sys().AuditHash("file", passwords[0])
	if err != nil || !strings.HasPrefix(hash, "hmac-sha256:") {
		t.Fatalf("audit-hash = %q, %v", hash, err)
	}
	tokenHash, _ := client.Sys().AuditHash("file", token)

	var reads, responses int
	var denied bool
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e struct {
			Type  string `json:"type"`
			Error string `json:"error"`
			Auth  struct {
				ClientToken string `json:"client_token"`
			}
			Request struct {
				Path        string `json:"path"`
				Operation   string `json:"operation"`
				ClientToken string `json:"client_token"`
				MountType   string `json:"mount_type"`
			} `json:"request"`
			Response struct {
				Secret struct {
					LeaseID string `json:"lease_id"`
				} `json:"secret"`
				Data map[string]any `json:"data"`
			} `json:"response"`
		}
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("audit line is not JSON: %v\n%s", err, sc.Bytes())
		}
		switch {
		case e.Request.Path == "database/creds/app" && e.Request.Operation == "read" && e.Type == "request":
			reads++
			if e.Request.ClientToken != tokenHash || e.Request.MountType != "database" || e.Auth.ClientToken != tokenHash {
				t.Errorf("request entry = %s", sc.Bytes())
			}
		case e.Request.Path == "database/creds/app" && e.Type == "response":
			responses++
			if !strings.HasPrefix(e.Response.Secret.LeaseID, "database/creds/app/") {
				t.Errorf("response lease = %q", e.Response.Secret.LeaseID)
			}
			if p := e.Response.Data["password"]; responses == 1 && p != hash {
				t.Errorf("password in audit = %v, want %s", p, hash)
			}
		case e.Request.Path == "database/creds/short" && e.Type == "request":
			denied = strings.Contains(e.Error, "permission denied")
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if reads != 2 || responses != 2 || !denied {
		t.Errorf("audit: %d creds requests, %d responses, denial logged %v", reads, responses, denied)
	}

	// The login token's leases go with it when the token is revoked.
	if err := tc.Auth().Token().RevokeSelf(""); err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		h.roleGone(t, admin, u)
	}
}
