package integration

import (
	"context"
	"encoding/binary"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

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
// It returns once credproxy has closed the app's socket, which it does
// before it resets the backend for the pool: waitPooled waits for that.
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

// waitBackendGone waits until the backend pid has exited.
func waitBackendGone(t *testing.T, ctx context.Context, super *pgx.Conn, pid string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int
		if err := super.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", pid).Scan(&n); err != nil {
			t.Fatalf("pg_stat_activity: %v", err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend %s still runs: it was kept", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPoolNotReusedWhenUnclean ends sessions in states a reset cannot be
// trusted to undo, or after an error, and checks that their backends are
// closed, not reused; a clean session's backend is.
func TestPoolNotReusedWhenUnclean(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	p := poolProxy(t, pg, poolConfig(1))
	addr := p.addr(t, "app")
	ctx := testCtx(t, 3*time.Minute)
	super := superConn(t, ctx, pg)
	if _, err := super.Exec(ctx, "CREATE TABLE pool_copy (x int); GRANT ALL ON pool_copy TO "+pgtest.ScramUser); err != nil {
		t.Fatal(err)
	}

	// send writes raw protocol messages (the state pgx would not leave)
	// and reads until want arrives.
	send := func(t *testing.T, conn *pgx.Conn, want byte, msgs ...pgproto3.FrontendMessage) {
		t.Helper()
		fe := conn.PgConn().Frontend()
		for _, m := range msgs {
			fe.Send(m)
		}
		if err := fe.Flush(); err != nil {
			t.Fatalf("send: %v", err)
		}
		for {
			m, err := fe.Receive()
			if err != nil {
				t.Fatalf("receive: %v", err)
			}
			if enc, _ := m.Encode(nil); len(enc) > 0 && enc[0] == want {
				return
			}
		}
	}
	cases := []struct {
		name   string
		leave  func(t *testing.T, conn *pgx.Conn)
		reused bool
	}{
		{name: "inside a transaction", leave: func(t *testing.T, conn *pgx.Conn) {
			if _, err := conn.Exec(ctx, "BEGIN; SELECT 1"); err != nil {
				t.Fatal(clientErr(t, err))
			}
		}},
		{name: "in a failed transaction", leave: func(t *testing.T, conn *pgx.Conn) {
			_, _ = conn.Exec(ctx, "BEGIN")
			if _, err := conn.Exec(ctx, "SELECT 1/0"); err == nil {
				t.Fatal("SELECT 1/0 succeeded")
			}
		}},
		{name: "an error awaiting its Sync", leave: func(t *testing.T, conn *pgx.Conn) {
			send(t, conn, 'E', &pgproto3.Parse{Query: "SELEC 1"}, &pgproto3.Flush{})
		}},
		{name: "inside COPY FROM STDIN", leave: func(t *testing.T, conn *pgx.Conn) {
			send(t, conn, 'G', &pgproto3.Query{String: "COPY pool_copy FROM STDIN"})
		}},
		{name: "a query in flight", leave: func(t *testing.T, conn *pgx.Conn) {
			fe := conn.PgConn().Frontend()
			fe.Send(&pgproto3.Query{String: "SELECT pg_sleep(0.2)"})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after an error outside a transaction", leave: func(t *testing.T, conn *pgx.Conn) {
			if _, err := conn.Exec(ctx, "SELECT 1/0"); err == nil {
				t.Fatal("SELECT 1/0 succeeded")
			}
		}},
	}
	cases = append(cases, struct {
		name   string
		leave  func(t *testing.T, conn *pgx.Conn)
		reused bool
	}{name: "a clean session is reused", reused: true, leave: func(t *testing.T, conn *pgx.Conn) {
		if _, err := conn.Exec(ctx, "BEGIN; SELECT 1; COMMIT"); err != nil {
			t.Fatal(clientErr(t, err))
		}
	}})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conn := simpleConn(t, ctx, addr)
			pid := backendPID(t, ctx, conn)
			tc.leave(t, conn)
			closeConn(t, conn)
			next := simpleConn(t, ctx, addr) // waits for the one backend's place
			got := backendPID(t, ctx, next)
			if tc.reused {
				if got != pid {
					t.Errorf("backend %s was not reused (got %s)", pid, got)
				}
			} else {
				if got == pid {
					t.Fatalf("backend %s was reused", pid)
				}
				waitBackendGone(t, ctx, super, pid)
			}
			if tx := mustQueryString(t, ctx, next, "SELECT count(*)::text FROM pg_prepared_statements"); tx != "0" {
				t.Errorf("next session sees %s prepared statements", tx)
			}
			closeConn(t, next)
		})
	}
	if got := metric(t, p, "credproxy_pool_closed_total", map[string]string{"reason": "unclean"}); got != 6 {
		t.Errorf("pool_closed_total{reason=unclean} = %v, want 6", got)
	}

	// A backend that ends while idle in the pool (an administrator, or
	// idle_session_timeout, terminates it: it sends a FATAL and closes)
	// is not handed out; the next session logs in anew.
	t.Run("terminated while idle", func(t *testing.T) {
		conn := simpleConn(t, ctx, addr)
		pid := backendPID(t, ctx, conn)
		closeConn(t, conn)
		waitPooled(t, p, 1)
		var ok bool
		if err := super.QueryRow(ctx, "SELECT pg_terminate_backend($1::int)", pid).Scan(&ok); err != nil || !ok {
			t.Fatalf("pg_terminate_backend(%s): %v, %v", pid, ok, err)
		}
		waitBackendGone(t, ctx, super, pid)
		next := simpleConn(t, ctx, addr)
		if got := backendPID(t, ctx, next); got == pid {
			t.Fatalf("the terminated backend %s was handed out", pid)
		}
		closeConn(t, next)
		if got := metric(t, p, "credproxy_pool_closed_total", map[string]string{"reason": "broken"}); got != 1 {
			t.Errorf("pool_closed_total{reason=broken} = %v, want 1", got)
		}
	})
}

// waitPooled waits until n upstream connections are idle in the pool.
func waitPooled(t *testing.T, p *proxyHarness, n float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for metric(t, p, "credproxy_pool_server_connections", map[string]string{"state": "idle"}) != n {
		if time.Now().After(deadline) {
			t.Fatalf("the pool did not get to %v idle connections", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPoolBoundUnderConcurrentConnects opens 200 sessions at once against
// a pool of 5: PostgreSQL never sees more than 5 of credproxy's backends,
// and every session is served (the waiters get a backend as others end).
// A session that cannot get one in wait_timeout gets FATAL 53300.
func TestPoolBoundUnderConcurrentConnects(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	const maxConns, clients = 5, 200
	p := poolProxy(t, pg, poolConfig(maxConns))
	addr := p.addr(t, "app")
	ctx := testCtx(t, 5*time.Minute)
	super := superConn(t, ctx, pg)

	// Sample the backends credproxy holds while the clients run.
	stop := make(chan struct{})
	var peak int
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			var n int
			if err := super.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", pgtest.ScramUser).Scan(&n); err == nil {
				peak = max(peak, n)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	pids := make(chan string, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, appDSN(addr))
			if err != nil {
				errs <- clientErr(t, err)
				return
			}
			defer conn.Close(context.Background())
			var pid string
			if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()::text FROM pg_sleep(0.01)").Scan(&pid); err != nil {
				errs <- clientErr(t, err)
				return
			}
			pids <- pid
		}()
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	close(errs)
	close(pids)
	for err := range errs {
		t.Errorf("a client failed: %v", err)
	}
	distinct := map[string]bool{}
	for pid := range pids {
		distinct[pid] = true
	}
	if peak > maxConns {
		t.Errorf("PostgreSQL saw %d of credproxy's backends at once, want at most %d", peak, maxConns)
	}
	hits := metric(t, p, "credproxy_pool_acquires_total", map[string]string{"result": "hit"})
	waits := metric(t, p, "credproxy_pool_waits_total", nil)
	closed := map[string]float64{}
	for _, reason := range []string{"unclean", "reset_failed", "broken", "evicted", "stale", "lease", "idle_timeout", "max_lifetime"} {
		if n := metric(t, p, "credproxy_pool_closed_total", map[string]string{"reason": reason}); n > 0 {
			closed[reason] = n
		}
	}
	t.Logf("%d clients, pool of %d: peak %d backends, %d distinct; %v hits, %v waited; closed %v",
		clients, maxConns, peak, len(distinct), hits, waits, closed)
	// A backend closed on the way is replaced: that is all that may add one.
	replaced := 0
	for _, n := range closed {
		replaced += int(n)
	}
	if len(distinct) > maxConns+replaced {
		t.Errorf("%d distinct backends served the sessions, want at most %d (+%d replaced)", len(distinct), maxConns, replaced)
	}

	// A pool that stays full: the next session waits wait_timeout, then
	// gets FATAL 53300 naming the bound.
	t.Run("wait times out", func(t *testing.T) {
		pool := poolConfig(1)
		pool.WaitTimeout = config.Duration(500 * time.Millisecond)
		p := poolProxy(t, pg, pool)
		addr := p.addr(t, "app")
		holder := mustConnect(t, ctx, appDSN(addr))
		_ = backendPID(t, ctx, holder)
		_, err := connect(t, ctx, appDSN(addr))
		if err == nil {
			t.Fatal("a second session got a backend past max_server_connections 1")
		}
		pe := pgError(t, err)
		if pe.Code != "53300" || !strings.Contains(pe.Message, "pool.max_server_connections 1") {
			t.Errorf("got %s %q, want 53300 naming pool.max_server_connections", pe.Code, pe.Message)
		}
		if got := metric(t, p, "credproxy_pool_acquires_total", map[string]string{"result": "timeout"}); got != 1 {
			t.Errorf("pool_acquires_total{result=timeout} = %v, want 1", got)
		}
		// The holder is unaffected.
		_ = backendPID(t, ctx, holder)
	})
}

// TestPoolCancelKeyNotReused checks that a reused backend's cancel keys
// are the current session's: the previous session's key, sent while the
// next session's query runs on the same backend, cancels nothing.
func TestPoolCancelKeyNotReused(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	p := poolProxy(t, pg, poolConfig(1))
	addr := p.addr(t, "app")
	ctx := testCtx(t, 2*time.Minute)

	first := mustConnect(t, ctx, appDSN(addr))
	pid := backendPID(t, ctx, first)
	oldPID, oldSecret := first.PgConn().PID(), binary.BigEndian.Uint32(first.PgConn().SecretKey())
	closeConn(t, first)

	second := mustConnect(t, ctx, appDSN(addr))
	if got := backendPID(t, ctx, second); got != pid {
		t.Fatalf("second session got backend %s, want %s", got, pid)
	}
	newSecret := binary.BigEndian.Uint32(second.PgConn().SecretKey())
	if second.PgConn().PID() != oldPID || newSecret == oldSecret {
		t.Fatalf("second session's key (%d, same secret: %t): want the backend's pid %d and a new secret",
			second.PgConn().PID(), newSecret == oldSecret, oldPID)
	}
	sendCancel := func(pid, secret uint32) {
		c := rawConn(t, addr)
		if _, err := c.Write(cancelRequest(pid, secret)); err != nil {
			t.Fatal(err)
		}
		_, _, _ = readUntilClosed(c, 5*time.Second)
	}
	done := make(chan error, 1)
	go func() {
		_, err := second.Exec(ctx, "SELECT pg_sleep(1.5)")
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	sendCancel(oldPID, oldSecret)
	if err := <-done; err != nil {
		t.Fatalf("the previous session's cancel key cancelled the next session's query: %v", clientErr(t, err))
	}
	go func() {
		_, err := second.Exec(ctx, "SELECT pg_sleep(30)")
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	sendCancel(second.PgConn().PID(), newSecret)
	if err := <-done; err == nil || pgError(t, err).Code != "57014" {
		t.Fatalf("the session's own cancel key: %v, want 57014", err)
	}
}

// TestPoolStartupParametersKey checks that a backend serves only an app
// whose startup parameters match the ones it was opened with.
func TestPoolStartupParametersKey(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	pool := poolConfig(2)
	// alpha's reset is slow: beta's session starts, and beta's backend is
	// back in the pool, while alpha's is still being reset. (DISCARD ALL
	// cannot run in a query of several statements; what this test's
	// sessions leave is settings and pgx's prepared statements.)
	pool.ResetQuery = "SELECT pg_sleep(CASE current_setting('application_name') WHEN 'alpha' THEN 0.3 ELSE 0 END); RESET ALL; DEALLOCATE ALL"
	p := poolProxy(t, pg, pool)
	addr := p.addr(t, "app")
	ctx := testCtx(t, 2*time.Minute)
	open := func(app string) (*pgx.Conn, string) {
		conn := mustConnect(t, ctx, appDSN(addr)+" application_name="+app)
		if got := mustQueryString(t, ctx, conn, "SHOW application_name"); got != app {
			t.Errorf("application_name = %q, want %q", got, app)
		}
		return conn, backendPID(t, ctx, conn)
	}
	// An app's close returns once credproxy has closed its socket, before
	// the backend is reset and back in the pool: the next session starts
	// once it is (waitPooled). Without that wait, alpha's second session
	// could find alpha's backend still in its reset and beta's idle, and
	// with the pool full it closed beta's to log in anew (the flake, under
	// load; every time with alpha's slow reset above).
	a, pidA := open("alpha")
	closeConn(t, a)
	waitPooled(t, p, 1)
	b, pidB := open("beta")
	if pidB == pidA {
		t.Errorf("an app with application_name beta got alpha's backend")
	}
	closeConn(t, b)
	waitPooled(t, p, 2)
	a2, pidA2 := open("alpha")
	if pidA2 != pidA {
		t.Errorf("alpha got backend %s, want its own %s again", pidA2, pidA)
	}
	closeConn(t, a2)
}

// TestPoolRotatedLeaseNotHandedOut runs short sessions through a pool
// while Vault's leases reach their max TTL: each lease's backends serve
// only until it is retired, then are closed; no session gets a backend of
// a lease older than one it has already seen.
func TestPoolRotatedLeaseNotHandedOut(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	db := v.setupDatabase(t, pg, &rotatingRole)
	cfg := vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()})
	pool := poolConfig(2)
	cfg.Postgres[0].Pool = &pool
	p := startProxy(t, cfg)
	addr := p.addr(t, "appdb")
	ctx := testCtx(t, 3*time.Minute)
	super := superConn(t, ctx, pg)

	type seen struct{ user, pid string }
	var sessions []seen
	users := map[string]int{} // user -> order of first appearance
	userOf := map[string]string{}
	deadline := time.Now().Add(60 * time.Second)
	for len(users) < 3 && time.Now().Before(deadline) {
		conn := simpleConn(t, ctx, addr)
		var s seen
		if err := conn.QueryRow(ctx, "SELECT current_user, pg_backend_pid()::text").Scan(&s.user, &s.pid); err != nil {
			t.Fatalf("query: %v", clientErr(t, err))
		}
		closeConn(t, conn)
		if _, ok := users[s.user]; !ok {
			users[s.user] = len(users)
		}
		if u, ok := userOf[s.pid]; ok && u != s.user {
			t.Errorf("backend %s served %s and then %s", s.pid, u, s.user)
		}
		userOf[s.pid] = s.user
		if n := len(sessions); n > 0 && users[s.user] < users[sessions[n-1].user] {
			t.Errorf("session %d got a backend of %s after %s's lease had replaced it", n, s.user, sessions[n-1].user)
		}
		sessions = append(sessions, s)
		time.Sleep(100 * time.Millisecond)
	}
	if len(users) < 3 {
		t.Fatalf("saw %d leases in 60s of 6s max TTLs", len(users))
	}
	hits := metric(t, p, "credproxy_pool_acquires_total", map[string]string{"result": "hit"})
	drained := metric(t, p, "credproxy_pool_closed_total", map[string]string{"reason": "lease"}) +
		metric(t, p, "credproxy_pool_closed_total", map[string]string{"reason": "stale"})
	t.Logf("%d sessions over %d leases on %d backends: %v hits, %v backends closed with their lease",
		len(sessions), len(users), len(userOf), hits, drained)
	if hits == 0 {
		t.Error("no session reused a backend")
	}
	if drained == 0 {
		t.Error("no pooled backend was closed with its lease")
	}
	// The retired leases' backends are gone, not parked.
	current := sessions[len(sessions)-1].user
	for user := range users {
		if user == current {
			continue
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			var n int
			if err := super.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", user).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%d backends of retired lease %s still open", n, user)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// TestPoolOverTLS reuses a backend reached over verify-full TLS, and
// notices one that its server ended while it was idle.
func TestPoolOverTLS(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{TLS: true})
	svc := pgService("app", pg.Addr(), "app", config.PostgresTLS{Mode: "verify-full", CAFile: pg.CAFile, ServerName: "localhost"})
	pool := poolConfig(1)
	svc.Pool = &pool
	p := startProxy(t, &config.Config{
		Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
		Postgres: []config.Postgres{svc},
	})
	addr := p.addr(t, "app")
	ctx := testCtx(t, 2*time.Minute)
	super := superConn(t, ctx, pg)

	first := simpleConn(t, ctx, addr)
	pid := backendPID(t, ctx, first)
	if ssl := mustQueryString(t, ctx, first, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"); ssl != "true" {
		t.Fatalf("upstream connection not over TLS: ssl = %s", ssl)
	}
	if _, err := first.Exec(ctx, "SET search_path = nowhere"); err != nil {
		t.Fatal(clientErr(t, err))
	}
	closeConn(t, first)
	second := simpleConn(t, ctx, addr)
	if got := backendPID(t, ctx, second); got != pid {
		t.Fatalf("over TLS: second session got backend %s, want %s", got, pid)
	}
	if sp := mustQueryString(t, ctx, second, "SHOW search_path"); sp == "nowhere" {
		t.Error("the reset did not run over TLS: search_path is the first session's")
	}
	closeConn(t, second)

	waitPooled(t, p, 1)
	if _, err := super.Exec(ctx, "SELECT pg_terminate_backend($1::int)", pid); err != nil {
		t.Fatal(err)
	}
	waitBackendGone(t, ctx, super, pid)
	third := simpleConn(t, ctx, addr)
	if got := backendPID(t, ctx, third); got == pid {
		t.Fatalf("a TLS backend terminated while idle was handed out")
	}
}

// TestPoolMigratedSessionReturnsItsNewBackend keeps a session open while
// its lease reaches its max TTL: it migrates to a fresh credential, and
// when it ends, the backend it moved to (not the old one) goes back to
// the pool and serves the next session.
func TestPoolMigratedSessionReturnsItsNewBackend(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	db := v.setupDatabase(t, pg, &rotatingRole)
	cfg := vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()})
	pool := poolConfig(1)
	cfg.Postgres[0].Pool = &pool
	p := startProxy(t, cfg)
	addr := p.addr(t, "appdb")
	ctx := testCtx(t, 2*time.Minute)
	super := superConn(t, ctx, pg)

	conn := simpleConn(t, ctx, addr)
	user := mustQueryString(t, ctx, conn, "SELECT current_user")
	oldPID := backendPID(t, ctx, conn)
	newUser := waitUserChange(t, ctx, conn, user, 30*time.Second)
	newPID := backendPID(t, ctx, conn)
	if newPID == oldPID {
		t.Fatalf("the session's backend did not change with its credential")
	}
	closeConn(t, conn)
	waitBackendGone(t, ctx, super, oldPID)
	// The app's close returns before the backend is reset and back in the
	// pool; a session started sooner finds the pool busy (the flake under
	// load: it got a fresh backend).
	waitPooled(t, p, 1)

	next := simpleConn(t, ctx, addr)
	var gotUser, gotPID string
	if err := next.QueryRow(ctx, "SELECT current_user, pg_backend_pid()::text").Scan(&gotUser, &gotPID); err != nil {
		t.Fatal(clientErr(t, err))
	}
	// The lease the session moved to may itself have been retired by now
	// (6s max TTL); then a fresh backend is right too. It is never the old one.
	if gotPID == oldPID {
		t.Fatalf("the next session got the migrated-away backend %s", oldPID)
	}
	if gotUser == newUser && gotPID != newPID {
		t.Errorf("the next session on %s got backend %s, want the migrated session's %s", newUser, gotPID, newPID)
	}
	t.Logf("migrated %s/%s -> %s/%s; next session %s/%s", user, oldPID, newUser, newPID, gotUser, gotPID)
}
