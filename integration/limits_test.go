package integration

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
)

// TestTooManyClients: over postgres[].max_sessions and max_handshakes,
// real clients (pgx, and libpq through psql, which opens with an
// SSLRequest) read the refusal PostgreSQL 15 itself sends over
// max_connections — FATAL 53300 "sorry, too many clients already" — with
// credproxy's prefix and the limit that was reached.
func TestTooManyClients(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	svc := pgService("app", pg.Addr(), "app", config.PostgresTLS{})
	svc.MaxSessions = 2
	svc.MaxHandshakes = 1
	cfg := &config.Config{
		Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
		Postgres: []config.Postgres{svc},
	}
	p := startProxy(t, cfg)
	addr := p.addr(t, "app")
	ctx := testCtx(t, time.Minute)

	for range 2 {
		mustConnect(t, ctx, appDSN(addr))
	}
	_, err := connect(t, ctx, appDSN(addr))
	if err == nil {
		t.Fatal("a third session got through max_sessions 2")
	}
	pgErr := pgError(t, err)
	if pgErr.Severity != "FATAL" || pgErr.Code != "53300" || pgErr.Message != "credproxy: sorry, too many clients already: max_sessions 2 reached" {
		t.Errorf("pgx saw %s %s %q", pgErr.Severity, pgErr.Code, pgErr.Message)
	}
	host, port := hostPort(t, addr)
	_, out, err := runClient(t, 30*time.Second, "psql", "-h", host, "-p", port, "-U", "app_user", "-d", pgtest.AppDB, "-c", "select 1")
	if err == nil || !strings.Contains(out, "sorry, too many clients already: max_sessions 2 reached") {
		t.Errorf("psql at max_sessions: %v\n%s", err, out)
	}

	// A client that sends nothing holds the one handshake place; the
	// next is refused at once, not after startup_timeout.
	silent := rawConn(t, addr)
	defer silent.Close()
	// Its SSLRequest answered, it is in its handshake.
	if _, err := silent.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}); err != nil {
		t.Fatal(err)
	}
	_ = silent.SetReadDeadline(time.Now().Add(30 * time.Second))
	answer := make([]byte, 1)
	if _, err := io.ReadFull(silent, answer); err != nil || answer[0] != 'N' {
		t.Fatalf("SSLRequest answered %q, %v; want N", answer, err)
	}
	start := time.Now()
	_, out, err = runClient(t, 30*time.Second, "psql", "-h", host, "-p", port, "-U", "app_user", "-d", pgtest.AppDB, "-c", "select 1")
	if err == nil || !strings.Contains(out, "too many clients already") {
		t.Errorf("psql at max_handshakes: %v\n%s", err, out)
	}
	if d := time.Since(start); d > svc.StartupTimeout.D() {
		t.Errorf("the refusal took %s", d)
	}
	t.Logf("psql saw: %s", strings.TrimSpace(out))
}
