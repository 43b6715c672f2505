package integration

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/proxy/audit"
)

// Session migration (issues 10 and 15): long-lived sessions move to a fresh
// credential at a transaction boundary when theirs ends, against real
// PostgreSQL 15 and the in-process Vault with short TTLs.

// migrationSetup starts PostgreSQL (pgbench's tables loaded, so Vault's
// roles may use them), Vault with a database role of the given TTLs, and
// credproxy in front, logging in to Vault with auth (nil: a token file).
func migrationSetup(t *testing.T, role dbRole, auth func(v *testVault, db dbEngine) config.VaultAuth) (*pgtest.Server, *testVault, dbEngine, *proxyHarness) {
	t.Helper()
	pg := startVaultPG(t, pgtest.Options{})
	if _, out, err := runClient(t, 2*time.Minute, "pgbench", "-i", "-s", "1", "-q",
		"-h", pg.SocketDir, "-p", strconv.Itoa(pg.Port), "-U", pgtest.Superuser, pgtest.AppDB); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	v := startVault(t)
	db := v.setupDatabase(t, pg, &role)
	var a config.VaultAuth
	if auth == nil {
		a = tokenAuth(v.tokenFile(t, db))
	} else {
		a = auth(v, db)
	}
	p := startProxy(t, vaultProxyConfig(v, pg, a, config.VaultSecret{Path: db.CredsPath()}))
	return pg, v, db, p
}

// rotatingRole's leases rotate every 8s or so: the first renewal, at 8s,
// is capped at the 18s max TTL, which leaves 9.5s to move the sessions;
// a renewal has 4s to get through. Shorter TTLs make the tests faster
// but fail on a busy machine, where Vault's renewals and credential
// reads (statements in PostgreSQL) and the sessions' new logins can take
// seconds.
var rotatingRole = dbRole{DefaultTTL: 12 * time.Second, MaxTTL: 18 * time.Second}

// migrations are the session_migrated records so far.
func migrations(t *testing.T, p *proxyHarness) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, r := range p.auditRecords(t) {
		if r.Event == audit.EventSessionMigrated {
			out = append(out, r)
		}
	}
	return out
}

// waitMigrated waits until the session of conn (by its db_user now) has
// moved away from user, and returns its new user.
func waitUserChange(t *testing.T, ctx context.Context, conn *pgx.Conn, from string, limit time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		var user string
		if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
			t.Fatalf("SELECT current_user while waiting for the migration: %v", clientErr(t, err))
		}
		if user != from {
			return user
		}
		if time.Now().After(deadline) {
			t.Fatalf("the session still runs as %s after %v", from, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMigrationPgbenchPersistent is the first case: pgbench with
// persistent connections across several rotations has no failed and
// no aborted transaction, and every session ends up on a fresh role while
// the old ones are gone.
func TestMigrationPgbenchPersistent(t *testing.T) {
	skipShort(t)
	t.Parallel()
	// Leases longer than rotatingRole's: the first renewal, at 14.7s, is
	// capped at the 34s max TTL (Vault truncates times to the second, so a
	// max TTL at least a second under 5/3 of the TTL caps it, and leases
	// rotate every 15s). That leaves about 18s to move four busy sessions,
	// enough for a Vault read that times out and the retry after it. Loaded
	// machines took all of shorter windows: with 9.5s, logins of 4-6s each
	// (-race, -count=3, a busy loop); with 13.5s, make test's packages in
	// parallel, where a creds read timed out after 7.8s and the next one
	// came 13s after the retirement.
	role := dbRole{DefaultTTL: 22 * time.Second, MaxTTL: 34 * time.Second}
	pg, v, db, p := migrationSetup(t, role, nil)
	host, port := "127.0.0.1", portOf(t, p.addr(t, "appdb"))
	const seconds = 60 // rotations at about 15s, 30s and 45s
	_, out, err := runClient(t, 3*time.Minute, "pgbench", "-n", "-T", strconv.Itoa(seconds), "-c", "4", "-j", "2",
		"-h", host, "-p", port, "-U", "app_user", pgtest.AppDB)
	if err != nil {
		t.Errorf("pgbench through credproxy: %v\n%s", err, out)
	}
	failed, processed := -1, 0
	if m := pgbenchFailed.FindStringSubmatch(out); m != nil {
		failed, _ = strconv.Atoi(m[1])
	}
	if m := pgbenchProcessed.FindStringSubmatch(out); m != nil {
		processed, _ = strconv.Atoi(m[1])
	}
	if failed != 0 || processed == 0 {
		t.Errorf("pgbench: %d transactions processed, %d failed (-1: not reported)\n%s", processed, failed, out)
	}
	lower := strings.ToLower(out)
	for _, bad := range []string{"error", "fatal", "abort"} {
		if strings.Contains(lower, bad) {
			t.Errorf("pgbench output mentions %q:\n%s", bad, out)
			break
		}
	}
	// pgbench may exit while a migration it had to wait for is still
	// being recorded.
	p.endedAuditRecords(t, 30*time.Second)
	ms := migrations(t, p)
	perSession := map[string]int{}
	for _, m := range ms {
		perSession[m.SessionID]++
	}
	t.Logf("pgbench -c 4 -T %d on 22s/34s leases: %d transactions, %d migrations %v, swap median ~%v",
		seconds, processed, len(ms), perSession, medianMS(ms))
	if len(perSession) != 4 {
		t.Errorf("%d sessions migrated, want all 4", len(perSession))
	}
	for id, n := range perSession {
		if n < 3 {
			t.Errorf("session %s migrated %d times in %ds of leases rotated every 15s, want at least 3", id, n, seconds)
		}
	}
	for _, r := range p.auditRecords(t) {
		if r.Event == audit.EventSessionEnd && deref(r.Error) != "" {
			t.Errorf("a session ended with an error: %s", deref(r.Error))
		}
	}
	if got := metric(t, p, "credproxy_migrations_total", map[string]string{"result": "ok"}); int(got) != len(ms) {
		t.Errorf("credproxy_migrations_total{result=ok} = %v, want %d", got, len(ms))
	}
	// The old roles are gone (revoked when their last session moved away);
	// Close revokes the current ones.
	if err := p.srv.Close(); err != nil {
		t.Errorf("proxy Close: %v", err)
	}
	if ids := v.leaseIDs(t, db.CredsPath()); len(ids) != 0 {
		t.Errorf("after Close Vault still holds %d leases", len(ids))
	}
	waitNoDynamicRoles(t, pg, 20*time.Second)
}

// superConn connects to pg directly as the superuser, for the test's own
// doings (NOTIFY from another session, checking a table).
func superConn(t *testing.T, ctx context.Context, pg *pgtest.Server) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, pg.DSN(pgtest.Superuser, pgtest.AppDB))
	if err != nil {
		t.Fatalf("connect as the superuser: %v", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func medianMS(ms []audit.Record) time.Duration {
	if len(ms) == 0 {
		return 0
	}
	ds := make([]int64, 0, len(ms))
	for _, m := range ms {
		if m.DurationMS != nil {
			ds = append(ds, *m.DurationMS)
		}
	}
	if len(ds) == 0 {
		return 0
	}
	for i := range ds {
		for j := i + 1; j < len(ds); j++ {
			if ds[j] < ds[i] {
				ds[i], ds[j] = ds[j], ds[i]
			}
		}
	}
	return time.Duration(ds[len(ds)/2]) * time.Millisecond
}

// TestMigrationCarriesState: settings, prepared statements (SQL PREPARE,
// protocol-level named ones, pgx's statement cache), LISTEN and the cancel
// key all work after the session moved.
func TestMigrationCarriesState(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg, _, _, p := migrationSetup(t, rotatingRole, nil)
	ctx := testCtx(t, 2*time.Minute)
	addr := p.addr(t, "appdb")
	// pgx caches prepared statements; cancelling a context sends a
	// CancelRequest, as libpq does.
	conn, err := connectConfig(t, ctx, cancelConfig(t, appDSN(addr)))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(context.Background())

	var user string
	var pid uint32
	if err := conn.QueryRow(ctx, "SELECT current_user, pg_backend_pid()").Scan(&user, &pid); err != nil {
		t.Fatalf("first query: %v", clientErr(t, err))
	}
	if pid != conn.PgConn().PID() {
		t.Errorf("the app's PID %d is not pg_backend_pid() %d", conn.PgConn().PID(), pid)
	}
	setup := []string{
		"SET search_path = 'migr_schema', public",
		"SET statement_timeout = '4321ms'",
		"SET application_name = 'migration-test'",
		"SET app.tenant = '42'",
		"SELECT set_config('app.region', 'eu', false)",
		"PREPARE sql_prepared(int) AS SELECT $1 + 1",
		"LISTEN migr_channel",
		`LISTEN "Mixed Case"`,
	}
	for _, q := range setup {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, clientErr(t, err))
		}
	}
	if _, err := conn.PgConn().Prepare(ctx, "proto_named", "SELECT $1::int * 2", nil); err != nil {
		t.Fatalf("protocol-level Prepare: %v", clientErr(t, err))
	}
	var cached int
	if err := conn.QueryRow(ctx, "SELECT $1::int + 100", 1).Scan(&cached); err != nil || cached != 101 {
		t.Fatalf("pgx cached statement: %d %v", cached, err)
	}

	newUser := waitUserChange(t, ctx, conn, user, 40*time.Second)
	t.Logf("moved from %s to %s", user, newUser)

	check := func(q, want string) {
		t.Helper()
		var got string
		if err := conn.QueryRow(ctx, q).Scan(&got); err != nil {
			t.Errorf("%s: %v", q, clientErr(t, err))
			return
		}
		if got != want {
			t.Errorf("%s = %q after the migration, want %q", q, got, want)
		}
	}
	check("SHOW search_path", "migr_schema, public")
	check("SHOW statement_timeout", "4321ms")
	check("SHOW application_name", "migration-test")
	check("SELECT current_setting('app.tenant')", "42")
	check("SELECT current_setting('app.region')", "eu")
	check("EXECUTE sql_prepared(41)", "42")
	// The same protocol-level statement, by name, without a Parse.
	res := conn.PgConn().ExecPrepared(ctx, "proto_named", [][]byte{[]byte("21")}, nil, nil).Read()
	if res.Err != nil || len(res.Rows) != 1 || string(res.Rows[0][0]) != "42" {
		t.Errorf("ExecPrepared proto_named after the migration: %v %q", res.Err, res.Rows)
	}
	if err := conn.QueryRow(ctx, "SELECT $1::int + 100", 2).Scan(&cached); err != nil || cached != 102 {
		t.Errorf("pgx cached statement after the migration: %d %v", cached, clientErr(t, err))
	}
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err == nil && pid == conn.PgConn().PID() {
		t.Logf("note: the new backend happens to have the old PID %d", pid)
	}

	// A NOTIFY after the migration reaches the idle listener; its own
	// NOTIFY carries the PID the app knows.
	other := superConn(t, ctx, pg)
	if _, err := other.Exec(ctx, "NOTIFY migr_channel, 'from another session'"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	n, err := conn.WaitForNotification(wctx)
	cancel()
	if err != nil || n.Channel != "migr_channel" || n.Payload != "from another session" {
		t.Errorf("notification after the migration: %+v %v", n, err)
	}
	if _, err := conn.Exec(ctx, `NOTIFY "Mixed Case", 'self'`); err != nil {
		t.Fatal(clientErr(t, err))
	}
	wctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	n, err = conn.WaitForNotification(wctx)
	cancel()
	if err != nil || n.Payload != "self" || n.PID != conn.PgConn().PID() {
		t.Errorf("own notification after the migration: %+v (app PID %d) %v", n, conn.PgConn().PID(), err)
	}

	// A cancel reaches the new backend.
	qctx, qcancel := context.WithCancel(ctx)
	time.AfterFunc(300*time.Millisecond, qcancel)
	start := time.Now()
	_, err = conn.Exec(qctx, "SELECT pg_sleep(20)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Errorf("cancelled query after the migration: %v, want 57014", err)
	}
	t.Logf("cancel after the migration took effect in %v", time.Since(start).Round(time.Millisecond))
	if conn.IsClosed() {
		t.Fatalf("the session closed on a cancel after the migration")
	}
	check("SELECT 'alive'", "alive")

	m := p.waitAudit(t, "session_migrated", event(audit.EventSessionMigrated, ""))
	if m.Carried == nil || m.Carried.Prepared < 2 || m.Carried.Listen != 2 || m.Carried.Settings < 5 {
		t.Errorf("session_migrated carried %+v; want >=5 settings, >=2 prepared, 2 channels", m.Carried)
	}
}

// TestMigrationUnmovableAndInTransaction: a session with a temporary table
// is ended at an idle point with a clear FATAL (not inside a transaction),
// a session that holds a transaction open past the lease's end is cut at
// that end, and only it; a plain session next to them moves.
func TestMigrationUnmovableAndInTransaction(t *testing.T) {
	skipShort(t)
	t.Parallel()
	_, _, _, p := migrationSetup(t, rotatingRole, nil)
	ctx := testCtx(t, 2*time.Minute)
	addr := p.addr(t, "appdb")

	temp := mustConnect(t, ctx, appDSN(addr))
	defer temp.Close(context.Background())
	if _, err := temp.Exec(ctx, "CREATE TEMP TABLE scratch(x int)"); err != nil {
		t.Fatal(clientErr(t, err))
	}
	inTx := mustConnect(t, ctx, appDSN(addr))
	defer inTx.Close(context.Background())
	tx, err := inTx.Begin(ctx)
	if err != nil {
		t.Fatal(clientErr(t, err))
	}
	plain := mustConnect(t, ctx, appDSN(addr))
	defer plain.Close(context.Background())
	var first string
	if err := plain.QueryRow(ctx, "SELECT current_user").Scan(&first); err != nil {
		t.Fatal(clientErr(t, err))
	}

	// The temp-table session: its next query finds the session ended with
	// a FATAL naming the reason, sent while it was idle.
	var tempErr error
	for deadline := time.Now().Add(40 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if _, tempErr = temp.Exec(ctx, "SELECT count(*) FROM scratch"); tempErr != nil {
			break
		}
	}
	var pgErr *pgconn.PgError
	if !errors.As(tempErr, &pgErr) || pgErr.Code != "57P01" || !strings.Contains(pgErr.Message, "temporary tables") {
		t.Errorf("temp-table session: %v; want FATAL 57P01 naming temporary tables", clientErr(t, tempErr))
	}
	// The open transaction: cut at the lease's end.
	var txErr error
	for deadline := time.Now().Add(40 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if _, txErr = tx.Exec(ctx, "SELECT 1"); txErr != nil {
			break
		}
	}
	if !errors.As(txErr, &pgErr) || !strings.Contains(pgErr.Message, "lease expired") {
		t.Errorf("session in a transaction: %v; want the lease-expired FATAL", clientErr(t, txErr))
	}
	if next := waitUserChange(t, ctx, plain, first, 40*time.Second); next == first {
		t.Errorf("the plain session did not move")
	}
	got := map[string]float64{}
	for _, res := range []string{"ok", "ended_unmovable_state", "ended_at_deadline"} {
		got[res] = metric(t, p, "credproxy_migrations_total", map[string]string{"result": res})
	}
	if got["ok"] < 1 || got["ended_unmovable_state"] < 1 || got["ended_at_deadline"] < 1 {
		t.Errorf("credproxy_migrations_total by result = %v; want each at least 1", got)
	}
}

// TestMigrationLeaseRevokedOutOfBand: Vault revokes the lease (and drops
// the role) behind credproxy's back; the refused renewal retires it and the
// open session moves to a new credential and keeps working.
func TestMigrationLeaseRevokedOutOfBand(t *testing.T) {
	skipShort(t)
	t.Parallel()
	_, v, db, p := migrationSetup(t, dbRole{DefaultTTL: 6 * time.Second, MaxTTL: time.Hour}, nil)
	ctx := testCtx(t, 2*time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr(t, "appdb")))
	defer conn.Close(context.Background())
	var first string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&first); err != nil {
		t.Fatal(clientErr(t, err))
	}
	if err := v.Client.Sys().RevokePrefix(db.CredsPath()); err != nil {
		t.Fatalf("revoke-prefix: %v", err)
	}
	// Until the next renewal (at 4s) notices, the session runs under a
	// dropped role; after it, under a new one.
	p.waitAudit(t, "session_migrated after the revocation", event(audit.EventSessionMigrated, ""))
	var now string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&now); err != nil {
		t.Fatalf("after the migration: %v", clientErr(t, err))
	}
	if now == first || !strings.HasPrefix(now, "v-") {
		t.Errorf("after the revocation the session runs as %q (was %q)", now, first)
	}
}

// TestMigrationAcrossTokenMaxTTL is issue 15: Vault revokes a token's
// leases with the token, so a session must not outlive its credential's
// token. With AppRole tokens of max TTL 14s and database leases of an hour,
// a session open across two token lifetimes keeps working (no invalid role
// OID), running under a new role after each, and pgbench with persistent
// connections across them fails no transaction.
func TestMigrationAcrossTokenMaxTTL(t *testing.T) {
	skipShort(t)
	t.Parallel()
	approle := func(v *testVault, db dbEngine) config.VaultAuth {
		return v.approle(t, v.credproxyPolicy(t, db, ""), map[string]any{"token_ttl": "9s", "token_max_ttl": "14s"})
	}
	_, _, _, p := migrationSetup(t, dbRole{DefaultTTL: time.Minute, MaxTTL: time.Hour}, approle)
	ctx := testCtx(t, 2*time.Minute)
	addr := p.addr(t, "appdb")

	var wg sync.WaitGroup
	wg.Add(1)
	var pgbenchOut string
	var pgbenchErr error
	go func() {
		defer wg.Done()
		host, port := "127.0.0.1", portOf(t, addr)
		_, pgbenchOut, pgbenchErr = runClient(t, 2*time.Minute, "pgbench", "-n", "-T", "24", "-c", "4", "-j", "2",
			"-h", host, "-p", port, "-U", "app_user", pgtest.AppDB)
	}()

	conn := mustConnect(t, ctx, appDSN(addr))
	defer conn.Close(context.Background())
	users := map[string]bool{}
	// A token's first renewal, at 6s, is capped at its 14s max TTL: a new
	// login, and the old token's leases move (8s before it ends), every
	// 6s or so.
	for end := time.Now().Add(24 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		var u string
		var n int
		if err := conn.QueryRow(ctx, "SELECT current_user, count(*) FROM pgbench_branches").Scan(&u, &n); err != nil {
			t.Fatalf("a query in a session open across token max TTLs failed: %v", clientErr(t, err))
		}
		users[u] = true
	}
	wg.Wait()
	t.Logf("one session over 24s of tokens with a 14s max TTL ran as %d roles", len(users))
	if len(users) < 3 {
		t.Errorf("the session ran as %d roles over 24s of tokens with a 14s max TTL, want at least 3", len(users))
	}
	if pgbenchErr != nil {
		t.Errorf("pgbench: %v\n%s", pgbenchErr, pgbenchOut)
	}
	if m := pgbenchFailed.FindStringSubmatch(pgbenchOut); m == nil || m[1] != "0" {
		t.Errorf("pgbench across token max TTLs:\n%s", pgbenchOut)
	}
}

// TestMigrationTokenRevokedOutOfBand: credproxy's own token is revoked;
// Vault revokes its leases and drops the roles. credproxy learns it at its
// next Vault request (a renewal answered 403), logs in again, and moves the
// open session to a credential read with the new token.
func TestMigrationTokenRevokedOutOfBand(t *testing.T) {
	skipShort(t)
	t.Parallel()
	var mount string
	approle := func(v *testVault, db dbEngine) config.VaultAuth {
		a := v.approle(t, v.credproxyPolicy(t, db, ""), map[string]any{"token_ttl": "1h"})
		mount = a.Mount
		return a
	}
	pg, v, _, p := migrationSetup(t, dbRole{DefaultTTL: 6 * time.Second, MaxTTL: time.Hour}, approle)
	ctx := testCtx(t, 2*time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr(t, "appdb")))
	defer conn.Close(context.Background())
	var first string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&first); err != nil {
		t.Fatal(clientErr(t, err))
	}
	var tokens []string
	for _, e := range v.auditEntries(t) {
		if e.Type == "response" && e.Request.Path == "auth/"+mount+"/login" && e.Response != nil && e.Response.Auth != nil {
			tokens = append(tokens, e.Response.Auth.ClientToken)
		}
	}
	if len(tokens) != 1 {
		t.Fatalf("found %d login tokens, want 1", len(tokens))
	}
	v.write(t, "auth/token/revoke", map[string]any{"token": tokens[0]})
	waitNoDynamicRoles(t, pg, 15*time.Second)
	p.waitAudit(t, "session_migrated after the token's revocation", event(audit.EventSessionMigrated, ""))
	var now string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&now); err != nil {
		t.Fatalf("after the migration: %v", clientErr(t, err))
	}
	if now == first {
		t.Errorf("still runs as the revoked token's role %q", now)
	}
}

// TestMigrationHostileTiming drives one session with pipelines, COPY and
// simple queries, back to back, while its credential rotates (every 8s
// or so, rotatingRole): every answer matches its question, in order, and
// every row COPY sent arrives once.
func TestMigrationHostileTiming(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg, _, _, p := migrationSetup(t, rotatingRole, nil)
	admin := superConn(t, testCtx(t, time.Minute), pg)
	if _, err := admin.Exec(context.Background(), "CREATE TABLE hostile(n bigint); GRANT ALL ON hostile TO PUBLIC"); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t, 2*time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr(t, "appdb")))
	defer conn.Close(context.Background())

	next, copied := int64(0), int64(0)
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); {
		// A pipeline of 20 queries, each echoing its number.
		b := &pgx.Batch{}
		base := next
		for i := range int64(20) {
			b.Queue("SELECT $1::bigint", base+i)
		}
		br := conn.SendBatch(ctx, b)
		for i := range int64(20) {
			var got int64
			if err := br.QueryRow().Scan(&got); err != nil || got != base+i {
				t.Fatalf("pipeline answer %d: got %d, %v", base+i, got, clientErr(t, err))
			}
		}
		if err := br.Close(); err != nil {
			t.Fatal(clientErr(t, err))
		}
		next += 20
		// COPY of 500 rows.
		rows := make([][]any, 500)
		for i := range rows {
			rows[i] = []any{copied + int64(i)}
		}
		n, err := conn.CopyFrom(ctx, pgx.Identifier{"hostile"}, []string{"n"}, pgx.CopyFromRows(rows))
		if err != nil || n != 500 {
			t.Fatalf("COPY: %d rows, %v", n, clientErr(t, err))
		}
		copied += 500
		// And a simple query.
		var s string
		if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT 'q%d'", next), pgx.QueryExecModeSimpleProtocol).Scan(&s); err != nil || s != fmt.Sprintf("q%d", next) {
			t.Fatalf("simple query: %q %v", s, clientErr(t, err))
		}
	}
	var count, distinct, maxN int64
	if err := admin.QueryRow(context.Background(), "SELECT count(*), count(DISTINCT n), max(n) FROM hostile").Scan(&count, &distinct, &maxN); err != nil {
		t.Fatal(err)
	}
	if count != copied || distinct != copied || maxN != copied-1 {
		t.Errorf("table holds %d rows (%d distinct, max %d); COPY sent %d", count, distinct, maxN, copied)
	}
	ms := migrations(t, p)
	t.Logf("%d pipelined queries, %d COPY rows, %d migrations of the one session", next, copied, len(ms))
	if len(ms) < 2 {
		t.Errorf("%d migrations in 30s of leases rotated every 8s; want at least 2", len(ms))
	}
}
