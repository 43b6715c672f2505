package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/proxy/audit"
)

// Server-connection reuse (issue 12 item 2): postgres[].pool against real
// PostgreSQL 15.

// poolProxy starts credproxy in front of pg with a pool on service
// "app" (scram_user's credential).
func poolProxy(t *testing.T, pg *pgtest.Server, pool config.PostgresPool) *proxyHarness {
	t.Helper()
	svc := pgService("app", pg.Addr(), "app", config.PostgresTLS{})
	svc.Pool = &pool
	svc.MaxSessions, svc.MaxHandshakes = 400, 400
	return startProxy(t, &config.Config{
		Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
		Postgres: []config.Postgres{svc},
	})
}

// poolConfig is a pool of max connections with generous timeouts.
func poolConfig(max int) config.PostgresPool {
	return config.PostgresPool{MaxServerConnections: max, IdleTimeout: config.Duration(time.Minute),
		MaxLifetime: config.Duration(time.Hour), ResetQuery: "DISCARD ALL", WaitTimeout: config.Duration(30 * time.Second)}
}

// simpleConn connects with the simple protocol, so that the app's own
// statements leave no prepared statement behind.
func simpleConn(t *testing.T, ctx context.Context, addr string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(appDSN(addr))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	conn, err := connectConfig(t, ctx, cfg)
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	return conn
}

func backendPID(t *testing.T, ctx context.Context, conn *pgx.Conn) string {
	t.Helper()
	return mustQueryString(t, ctx, conn, "SELECT pg_backend_pid()::text")
}

// closeConn ends a session the way an app does: Terminate, then close.
func closeConn(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
}

// starts are the session_start records in order.
func starts(t *testing.T, p *proxyHarness) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, r := range p.auditRecords(t) {
		if r.Event == audit.EventSessionStart {
			out = append(out, r)
		}
	}
	return out
}

// TestPoolResetClearsSessionState leaves a SET, a temporary table, SQL
// and protocol-level prepared statements and a LISTEN on a backend, ends
// the session, and checks that the next session gets the same backend
// with none of it.
func TestPoolResetClearsSessionState(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	p := poolProxy(t, pg, poolConfig(1)) // one backend: the second session must get it
	addr := p.addr(t, "app")
	ctx := testCtx(t, 2*time.Minute)

	first := mustConnect(t, ctx, appDSN(addr)) // pgx's statement cache: protocol-level prepared statements
	pid := backendPID(t, ctx, first)
	for _, sql := range []string{
		"SET statement_timeout = '12345'",
		"SET application_name = 'first-app'",
		"SET app.tenant = '42'",
		"CREATE TEMP TABLE scratch (x int)",
		"PREPARE byhand AS SELECT 1",
		"LISTEN first_channel",
	} {
		if _, err := first.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, clientErr(t, err))
		}
	}
	if n := mustQueryString(t, ctx, first, "SELECT count(*)::text FROM pg_prepared_statements WHERE NOT from_sql"); n == "0" {
		t.Fatal("pgx left no protocol-level prepared statement: the test would not test it")
	}
	closeConn(t, first)

	second := simpleConn(t, ctx, addr)
	if got := backendPID(t, ctx, second); got != pid {
		t.Fatalf("second session got backend %s, want the first's %s (reused)", got, pid)
	}
	for _, c := range []struct{ sql, want string }{
		{"SHOW statement_timeout", "0"},
		{"SHOW application_name", ""},
		{"SELECT coalesce(current_setting('app.tenant', true), '')", ""},
		{"SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema()", "0"},
		{"SELECT count(*)::text FROM pg_prepared_statements", "0"},
		{"SELECT count(*)::text FROM pg_listening_channels()", "0"},
		{"SELECT current_user", pgtest.ScramUser},
	} {
		if got := mustQueryString(t, ctx, second, c.sql); got != c.want {
			t.Errorf("reused backend: %s = %q, want %q", c.sql, got, c.want)
		}
	}
	// A notification on the first app's channel does not reach the second.
	if _, err := second.Exec(ctx, "NOTIFY first_channel, 'late'"); err != nil {
		t.Fatalf("NOTIFY: %v", clientErr(t, err))
	}
	nctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	n, err := second.WaitForNotification(nctx)
	cancel()
	if err == nil {
		t.Errorf("the second session got the first's notification %+v", n)
	}
	closeConn(t, second)

	ss := starts(t, p)
	if len(ss) != 2 || ss[0].BackendReused == nil || *ss[0].BackendReused || ss[1].BackendReused == nil || !*ss[1].BackendReused {
		t.Errorf("session_start backend_reused: want false then true; records:\n%s", auditDump(ss))
	}
	if got := metric(t, p, "credproxy_pool_acquires_total", map[string]string{"result": "hit"}); got != 1 {
		t.Errorf("pool_acquires_total{result=hit} = %v, want 1", got)
	}
	if got := metric(t, p, "credproxy_pool_acquires_total", map[string]string{"result": "miss"}); got != 1 {
		t.Errorf("pool_acquires_total{result=miss} = %v, want 1", got)
	}
}
