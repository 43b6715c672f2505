package integration

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/proxy/audit"
)

// TestSessionEndedByPostgres ends sessions the way PostgreSQL does —
// pg_terminate_backend, a fast and an immediate shutdown — and checks that
// credproxy records each as an abnormal end: session_end with the error
// and SQLSTATE, the metric's result "error", never "ok". A session the app
// ends itself stays a clean end. It also checks that session_start records
// the real backend PID, the one the app sees as its own.
func TestSessionEndedByPostgres(t *testing.T) {
	skipShort(t)
	t.Parallel()
	cases := []struct {
		name     string
		end      func(t *testing.T, pg *pgtest.Server, pid int)
		sqlstate string // "" for any
	}{
		{"pg_terminate_backend", func(t *testing.T, pg *pgtest.Server, pid int) {
			pg.Exec(t, fmt.Sprintf("SELECT pg_terminate_backend(%d)", pid))
		}, "57P01"},
		{"fast shutdown", func(t *testing.T, pg *pgtest.Server, _ int) { pg.Shutdown(t, "fast") }, "57P01"},
		// An immediate shutdown sends the app a WARNING, not a FATAL, then
		// closes: a connection lost.
		{"immediate shutdown", func(t *testing.T, pg *pgtest.Server, _ int) { pg.Shutdown(t, "immediate") }, "08006"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pg := startPG(t, pgtest.Options{})
			cfg := &config.Config{
				Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
				Postgres: []config.Postgres{pgService("app", pg.Addr(), "app", config.PostgresTLS{})},
			}
			p := startProxy(t, cfg)
			ctx := testCtx(t, 2*time.Minute)

			// A session the app ends is clean.
			clean := mustConnect(t, ctx, appDSN(p.addr(t, "app")))
			cleanAddr := clean.PgConn().Conn().LocalAddr().String()
			if err := clean.Close(ctx); err != nil {
				t.Fatal(err)
			}
			end := p.waitAudit(t, "clean session_end", event(audit.EventSessionEnd, cleanAddr))
			if deref(end.Error) != "" || end.SQLState != "" {
				t.Errorf("app-ended session: error %q sqlstate %q, want a clean end", deref(end.Error), end.SQLState)
			}

			conn := mustConnect(t, ctx, appDSN(p.addr(t, "app")))
			addr := conn.PgConn().Conn().LocalAddr().String()
			pidText := mustQueryString(t, ctx, conn, "SELECT pg_backend_pid()::text")
			pid, _ := strconv.Atoi(pidText)
			if got := conn.PgConn().PID(); int(got) != pid {
				t.Errorf("the app's BackendKeyData PID %d, pg_backend_pid() %d", got, pid)
			}
			start := p.waitAudit(t, "session_start", event(audit.EventSessionStart, addr))
			if start.BackendPID != int64(pid) {
				t.Errorf("session_start backend_pid %d, pg_backend_pid() %d", start.BackendPID, pid)
			}

			tc.end(t, pg, pid)
			qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if _, err := queryString(t, qctx, conn, "SELECT 'still there'"); err == nil {
				t.Fatal("the session survived its backend's end")
			}
			end = p.waitAudit(t, "session_end", event(audit.EventSessionEnd, addr))
			t.Logf("session_end: error %q sqlstate %s", deref(end.Error), end.SQLState)
			if deref(end.Error) == "" || end.SQLState == "" || (tc.sqlstate != "" && end.SQLState != tc.sqlstate) {
				t.Errorf("session_end error %q sqlstate %q, want an abnormal end with SQLSTATE %s", deref(end.Error), end.SQLState, tc.sqlstate)
			}
			if ok, bad := metric(t, p, "credproxy_sessions_total", map[string]string{"service": "app", "result": "ok"}),
				metric(t, p, "credproxy_sessions_total", map[string]string{"service": "app", "result": "error"}); ok != 1 || bad != 1 {
				t.Errorf("sessions_total ok %v error %v, want 1 and 1", ok, bad)
			}
			var line string
			for _, l := range strings.Split(string(p.logs.Bytes()), "\n") {
				if strings.Contains(l, `"session ended"`) && strings.Contains(l, addr) {
					line = l
				}
			}
			if !strings.Contains(line, `"result":"error"`) || !strings.Contains(line, `"sqlstate":"`+end.SQLState+`"`) {
				t.Errorf("session ended log line %q, want result error and sqlstate %s", line, end.SQLState)
			}
		})
	}
}
