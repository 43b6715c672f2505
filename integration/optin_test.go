package integration

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/proxy/audit"
)

// replicationConnect opens a replication connection (replication=mode)
// through dsn and runs IDENTIFY_SYSTEM on it.
func replicationConnect(t *testing.T, ctx context.Context, dsn, mode string) error {
	t.Helper()
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("parse DSN: %v", err)
	}
	cfg.RuntimeParams["replication"] = mode
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return clientErr(t, err)
	}
	defer conn.Close(ctx)
	res, err := conn.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll()
	if err != nil {
		return clientErr(t, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		t.Errorf("IDENTIFY_SYSTEM returned %d results", len(res))
	}
	return nil
}

// TestReplicationOptIn: replication connections are refused unless the
// service sets allow_replication, with the FATAL 42501 PostgreSQL sends a
// role without REPLICATION; allowed ones are marked in the audit.
func TestReplicationOptIn(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{HBA: []string{
		"host all all 127.0.0.1/32 scram-sha-256",
		"host replication all 127.0.0.1/32 scram-sha-256",
	}})
	superuser := staticSecret(pgtest.Superuser, pg.Password(pgtest.Superuser))
	refused := pgService("refused", pg.Addr(), "super", config.PostgresTLS{})
	allowed := pgService("allowed", pg.Addr(), "super", config.PostgresTLS{})
	allowed.AllowReplication = true
	cfg := &config.Config{
		Secrets:  map[string]config.Secret{"super": superuser},
		Postgres: []config.Postgres{refused, allowed},
	}
	p := startProxy(t, cfg)
	ctx := testCtx(t, 2*time.Minute)

	// What PostgreSQL itself says to a role without REPLICATION.
	direct := replicationConnect(t, ctx, pg.DSN(pgtest.ScramUser, pgtest.AppDB), "database")
	if direct == nil {
		t.Fatal("PostgreSQL let a role without REPLICATION start a walsender")
	}
	pgWant := pgError(t, direct)
	t.Logf("PostgreSQL says: %s %s %s", pgWant.Severity, pgWant.Code, pgWant.Message)

	for _, mode := range []struct{ param, audit string }{{"true", "physical"}, {"database", "logical"}} {
		t.Run("refused/"+mode.audit, func(t *testing.T) {
			err := replicationConnect(t, ctx, appDSN(p.addr(t, "refused")), mode.param)
			if err == nil {
				t.Fatal("a replication connection passed a service without allow_replication")
			}
			got := pgError(t, err)
			if got.Severity != "FATAL" || got.Code != pgWant.Code || !strings.Contains(got.Message, "allow_replication") {
				t.Errorf("refusal %s %s %q; want FATAL %s naming allow_replication", got.Severity, got.Code, got.Message, pgWant.Code)
			}
			d := p.waitAudit(t, "denied replication", func(r audit.Record) bool {
				return r.Event == audit.EventDenied && r.Service == "refused" && r.Replication == mode.audit
			})
			if d.Reason != "replication not allowed" || d.SQLState != pgWant.Code {
				t.Errorf("denied reason %q sqlstate %q", d.Reason, d.SQLState)
			}
		})
		t.Run("allowed/"+mode.audit, func(t *testing.T) {
			if err := replicationConnect(t, ctx, appDSN(p.addr(t, "allowed")), mode.param); err != nil {
				t.Fatalf("replication through a service with allow_replication: %v", err)
			}
			p.waitAudit(t, "session_start marked "+mode.audit, func(r audit.Record) bool {
				return r.Event == audit.EventSessionStart && r.Service == "allowed" && r.Replication == mode.audit
			})
		})
	}
	t.Run("replication=false is an ordinary session", func(t *testing.T) {
		conn := mustConnect(t, ctx, appDSN(p.addr(t, "refused"))+" replication=false")
		mustQueryString(t, ctx, conn, "SELECT 'ordinary'")
	})
}

// TestClientTLSRequired: with client_tls.required a plaintext app is
// refused as PostgreSQL refuses one that only a hostssl line would admit;
// TLS apps pass.
func TestClientTLSRequired(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{TLS: true, HBA: []string{
		"hostssl all all 127.0.0.1/32 scram-sha-256",
	}})
	certFile, keyFile := selfSignedCert(t, "localhost")
	svc := pgService("app", pg.Addr(), "app", config.PostgresTLS{Mode: "require"})
	svc.ClientTLS = &config.ClientTLS{CertFile: certFile, KeyFile: keyFile, Required: true}
	cfg := &config.Config{
		Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
		Postgres: []config.Postgres{svc},
	}
	p := startProxy(t, cfg)
	addr := p.addr(t, "app")
	ctx := testCtx(t, time.Minute)

	// What PostgreSQL itself says to a plaintext client of a hostssl line.
	dconn, direct := pgconn.Connect(ctx, pg.DSN(pgtest.ScramUser, pgtest.AppDB))
	if direct == nil {
		dconn.Close(ctx)
		t.Fatal("PostgreSQL took a plaintext connection with only hostssl in pg_hba.conf")
	}
	pgWant := pgError(t, direct)
	t.Logf("PostgreSQL says: %s %s %s", pgWant.Severity, pgWant.Code, pgWant.Message)

	t.Run("plaintext refused", func(t *testing.T) {
		_, err := connect(t, ctx, appDSN(addr))
		if err == nil {
			t.Fatal("a plaintext app connected to a service with client_tls.required")
		}
		got := pgError(t, err)
		if got.Severity != "FATAL" || got.Code != pgWant.Code || !strings.Contains(got.Message, "no encryption") {
			t.Errorf("refusal %s %s %q; want FATAL %s saying no encryption", got.Severity, got.Code, got.Message, pgWant.Code)
		}
		d := p.waitAudit(t, "denied plaintext", func(r audit.Record) bool { return r.Event == audit.EventDenied })
		if d.Reason != "client TLS required" || d.SQLState != pgWant.Code {
			t.Errorf("denied reason %q sqlstate %q", d.Reason, d.SQLState)
		}
	})
	t.Run("tls accepted", func(t *testing.T) {
		conn := mustConnect(t, ctx, strings.Replace(appDSN(addr), "sslmode=disable", "sslmode=verify-full sslrootcert="+certFile, 1))
		if _, ok := conn.PgConn().Conn().(*tls.Conn); !ok {
			t.Fatalf("the app's connection is %T, want TLS", conn.PgConn().Conn())
		}
		mustQueryString(t, ctx, conn, "SELECT 'over TLS'")
	})
}
