package integration

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/integration/vaulttest"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// The Vault tests: credproxy in front of a real PostgreSQL, with dynamic
// credentials from Vault's database secrets engine (see startVault for which
// Vault). Every Vault token, secret id, JWT, lease id and dynamic password
// Vault hands out is registered with the suite's no-leak collector by
// startVault's audit-log harvest, so TestMain fails if any of them shows up
// in credproxy's logs, audit records, client errors or pgbench's output.

// TestVaultDynamicCredentials: an app with no password runs as the role
// Vault created, and the audit log names the lease only by its hash.
func TestVaultDynamicCredentials(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour})
	p := startProxy(t, vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()}))
	ctx := testCtx(t, time.Minute)

	conn := mustConnect(t, ctx, appDSN(p.addr(t, "appdb")))
	user := mustQueryString(t, ctx, conn, "SELECT current_user")
	if !strings.HasPrefix(user, "v-") {
		t.Fatalf("current_user = %q, want a role Vault created (v-...)", user)
	}
	if roles := dynamicRoles(t, pg); len(roles) != 1 || roles[0] != user {
		t.Errorf("v- roles in PostgreSQL = %v, want exactly [%s]", roles, user)
	}
	clientAddr := conn.PgConn().Conn().LocalAddr().String()
	start := p.waitAudit(t, "session_start", event(audit.EventSessionStart, clientAddr))
	ids := v.leaseIDs(t, db.CredsPath())
	if len(ids) != 1 {
		t.Fatalf("Vault holds %d leases under %s, want 1", len(ids), db.CredsPath())
	}
	leaseID := ids[0]
	switch {
	case start.Credential != "app-dynamic":
		t.Errorf("session_start credential = %q, want app-dynamic", start.Credential)
	case start.DBUser != user:
		t.Errorf("session_start db_user = %q, want current_user %q", start.DBUser, user)
	case start.Lease == nil:
		t.Errorf("session_start has no lease")
	case start.Lease.TTLSecs <= 0 || start.Lease.TTLSecs > 3600:
		t.Errorf("session_start lease ttl_s = %d, want in (0, 3600]", start.Lease.TTLSecs)
	case start.Lease.IDSHA256 != sha256Hex(leaseID):
		t.Errorf("session_start lease id_sha256 = %q, want the SHA-256 of Vault's lease id (%s)", start.Lease.IDSHA256, sha256Hex(leaseID))
	}

	// A second session shares the credential: one Vault read in all.
	if u2 := mustSession(t, ctx, p.addr(t, "appdb"), "second session"); u2 != user {
		t.Errorf("second session ran as %q, want the shared credential's %q", u2, user)
	}
	if n := v.credsReads(t, db); n != 1 {
		t.Errorf("Vault served %d reads of %s, want 1", n, db.CredsPath())
	}
	if err := conn.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
	p.waitAudit(t, "session_end", event(audit.EventSessionEnd, clientAddr))

	// The lease id itself appears nowhere credproxy writes (the suite-wide
	// check covers client errors and every other test too).
	auditData, err := os.ReadFile(p.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	suffix := leaseID[strings.LastIndex(leaseID, "/")+1:]
	for what, data := range map[string][]byte{"audit log": auditData, "log": p.logs.Bytes()} {
		if bytes.Contains(data, []byte(suffix)) {
			t.Errorf("the lease id appears in credproxy's %s", what)
		}
	}
	if !bytes.Contains(auditData, []byte(sha256Hex(leaseID))) {
		t.Errorf("the audit log does not name the lease by its hash")
	}
}

var (
	pgbenchFailed    = regexp.MustCompile(`number of failed transactions: (\d+)`)
	pgbenchProcessed = regexp.MustCompile(`number of transactions actually processed: (\d+)`)
	pgbenchTPS       = regexp.MustCompile(`tps = ([0-9.]+)`)
)

// TestVaultRenewalAndRotation runs pgbench with a new connection per
// transaction for 60s against leases of 10s (max 30s): credproxy renews and
// rotates them under load with no failed transaction, and every role it
// made is dropped once it stops.
func TestVaultRenewalAndRotation(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	// pgbench's tables exist before Vault creates any role, so the creation
	// statements' GRANT ... ON ALL TABLES covers them.
	if _, out, err := runClient(t, 2*time.Minute, "pgbench", "-i", "-s", "1", "-q",
		"-h", pg.SocketDir, "-p", strconv.Itoa(pg.Port), "-U", pgtest.Superuser, pgtest.AppDB); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	v := startVault(t)
	db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: 10 * time.Second, MaxTTL: 30 * time.Second})
	p := startProxy(t, vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()}))

	host, port := "127.0.0.1", portOf(t, p.addr(t, "appdb"))
	_, out, err := runClient(t, 3*time.Minute, "pgbench", "-C", "-n", "-S", "-T", "60", "-c", "4", "-j", "2",
		"-h", host, "-p", port, "-U", "app_user", pgtest.AppDB)
	if err != nil {
		t.Errorf("pgbench through credproxy: %v", err)
	}
	failed, processed := -1, 0
	if m := pgbenchFailed.FindStringSubmatch(out); m != nil {
		failed, _ = strconv.Atoi(m[1])
	}
	if m := pgbenchProcessed.FindStringSubmatch(out); m != nil {
		processed, _ = strconv.Atoi(m[1])
	}
	tps := ""
	if m := pgbenchTPS.FindStringSubmatch(out); m != nil {
		tps = m[1]
	}
	if failed != 0 || processed == 0 {
		t.Errorf("pgbench: %d transactions processed, failed transactions %d (-1: not reported); want >0 and 0\n%s", processed, failed, out)
	}
	lower := strings.ToLower(out)
	for _, bad := range []string{"error", "fatal", "abort"} {
		if strings.Contains(lower, bad) {
			t.Errorf("pgbench output mentions %q:\n%s", bad, out)
			break
		}
	}

	renewed := metric(t, p, "credproxy_lease_renewals_total", map[string]string{"credential": "app-dynamic", "result": "ok"})
	renewFailed := metric(t, p, "credproxy_lease_renewals_total", map[string]string{"credential": "app-dynamic", "result": "error"})
	rotations := metric(t, p, "credproxy_rotations_total", map[string]string{"credential": "app-dynamic"})
	fetches := metric(t, p, "credproxy_credential_fetch_seconds_count", map[string]string{"credential": "app-dynamic"})
	users := map[string]int{}
	var denied, endErrors []string
	var starts, expiredLease, negative int
	var example *audit.Lease
	for _, r := range p.endedAuditRecords(t, 30*time.Second) {
		switch r.Event {
		case audit.EventSessionStart:
			starts++
			users[r.DBUser]++
			// ttl_s is what is left of the lease, renewals included.
			if r.Lease == nil || r.Lease.TTLSecs <= 0 {
				expiredLease++
				example = r.Lease
			}
			if r.Lease == nil || r.Lease.TTLSecs < 0 {
				negative++
			}
		case audit.EventDenied:
			denied = append(denied, r.Reason+": "+deref(r.Error))
		case audit.EventSessionEnd:
			if deref(r.Error) != "" {
				endErrors = append(endErrors, deref(r.Error))
			}
		}
	}
	t.Logf("pgbench -C -S -c 4 -T 60: %d transactions, %s tps, %d failed; %d Vault creds reads (%v fetches), %v renewals ok (%v failed), %v rotations, %d distinct roles",
		processed, tps, failed, v.credsReads(t, db), fetches, renewed, renewFailed, rotations, len(users))
	if renewed == 0 {
		t.Errorf("credproxy_lease_renewals_total{result=ok} = 0: no lease was renewed in 60s of 10s leases")
	}
	if rotations == 0 || len(users) < 2 {
		t.Errorf("rotations = %v, distinct db_user in session_start = %d: want a rotation within a 30s max_ttl over 60s", rotations, len(users))
	}
	// Were renewals ignored, most sessions of a lease used past its first
	// 10s (here up to 30s) would show ttl_s <= 0. A few may show 0 on a
	// loaded machine: a lease in use is handed out up to 5/6 of its TTL
	// while its renewal is in flight, a late renewal and a slow login can
	// leave under a second of it at session_start, and ttl_s is whole
	// seconds. None starts on a lease already past its expiry (ttl_s < 0).
	if expiredLease*50 > starts || negative > 0 {
		t.Errorf("%d of %d session_start records show no live lease (ttl_s <= 0), e.g. %+v: the audit's lease ttl_s ignores renewals", expiredLease, starts, example)
	} else if expiredLease > 0 {
		t.Logf("%d of %d session_start records with under a second of lease left (ttl_s 0)", expiredLease, starts)
	}
	if len(denied) > 0 {
		t.Errorf("%d sessions denied, e.g. %q", len(denied), denied[0])
	}
	if len(endErrors) > 0 {
		t.Errorf("%d sessions ended with an error, e.g. %q", len(endErrors), endErrors[0])
	}

	// Rotated-out leases were revoked once unused; Close revokes the rest.
	if err := p.srv.Close(); err != nil {
		t.Errorf("proxy Close: %v", err)
	}
	if ids := v.leaseIDs(t, db.CredsPath()); len(ids) != 0 {
		t.Errorf("after Close Vault still holds %d leases under %s", len(ids), db.CredsPath())
	}
	waitNoDynamicRoles(t, pg, 20*time.Second)
}

// TestVaultLeaseRevokedOutOfBand: a lease revoked behind credproxy's back
// (its role dropped) is noticed when PostgreSQL refuses it, and the login is
// retried once with a fresh credential: the app sees nothing.
func TestVaultLeaseRevokedOutOfBand(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour})
	p := startProxy(t, vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()}))
	ctx := testCtx(t, time.Minute)
	addr := p.addr(t, "appdb")

	first := mustSession(t, ctx, addr, "before the revocation")
	if err := v.Client.Sys().RevokePrefix(db.CredsPath()); err != nil {
		t.Fatalf("revoke-prefix %s: %v", db.CredsPath(), err)
	}
	if ids := v.leaseIDs(t, db.CredsPath()); len(ids) != 0 {
		t.Fatalf("after revoke-prefix Vault holds %d leases", len(ids))
	}
	waitNoDynamicRoles(t, pg, 10*time.Second)

	second := mustSession(t, ctx, addr, "after the revocation")
	if second == first {
		t.Errorf("the session after the revocation ran as the revoked role %q", first)
	}
	if third := mustSession(t, ctx, addr, "third session"); third != second {
		t.Errorf("third session ran as %q, want the fresh credential's %q", third, second)
	}
	if n := v.credsReads(t, db); n != 2 {
		t.Errorf("Vault served %d creds reads, want 2 (start, and one after the refusal)", n)
	}
	for _, r := range p.auditRecords(t) {
		if r.Event == audit.EventDenied {
			t.Errorf("a session was denied: %s %s", r.Reason, deref(r.Error))
		}
	}
}

// TestVaultUnavailable: with Vault down, new sessions get the cached
// credential while it is valid (also past its freshness, after a failed
// fetch), then a prompt 08006 naming the credential, and service returns
// when Vault does, without restarting credproxy.
func TestVaultUnavailable(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	if ok, why := v.canStop(); !ok {
		t.Skip(why)
	}
	// Fresh for 20s, valid until 1s before expiry: the stale-but-valid session
	// at 22.5s has 6.5s for its failed fetch (request_timeout, 2s) and a
	// loaded machine's delays around it.
	const ttl = 30 * time.Second
	db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: ttl, MaxTTL: ttl})
	cfg := vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()})
	// Short, so that each session below waits for the failed fetch (not
	// for connect_timeout) before it gets the cached credential or the
	// error.
	const requestTimeout = 2 * time.Second
	cfg.Vault.RequestTimeout = config.Duration(requestTimeout)
	p := startProxy(t, cfg) // fetches the credential before it returns
	started := time.Now()
	ctx := testCtx(t, 2*time.Minute)
	addr := p.addr(t, "appdb")

	cached := mustSession(t, ctx, addr, "Vault up")
	v.stop(t)
	if u := mustSession(t, ctx, addr, "Vault down, credential fresh"); u != cached {
		t.Errorf("Vault down: session ran as %q, want the cached %q", u, cached)
	}

	// Stale (past two thirds) but valid: credproxy tries Vault, fails within
	// request_timeout, and serves the cached credential.
	time.Sleep(time.Until(started.Add(ttl * 3 / 4)))
	if u := mustSession(t, ctx, addr, "Vault down, credential stale but valid"); u != cached {
		t.Errorf("Vault down: session ran as %q, want the cached %q", u, cached)
	}

	// Expired: a prompt 08006.
	time.Sleep(time.Until(started.Add(ttl + time.Second)))
	r := trySession(t, ctx, addr)
	if r.Err == nil {
		t.Fatalf("Vault down, credential expired: session succeeded as %q", r.User)
	}
	pgErr := pgError(t, r.Err)
	t.Logf("Vault down, credential expired: %s %s after %v", pgErr.Code, pgErr.Message, r.Elapsed.Round(time.Millisecond))
	if pgErr.Code != "08006" || !strings.Contains(pgErr.Message, `credential "app-dynamic" unavailable`) {
		t.Errorf("error = %s %q, want 08006 naming credential \"app-dynamic\" unavailable", pgErr.Code, pgErr.Message)
	}
	if limit := requestTimeout + 3*time.Second; r.Elapsed > limit {
		t.Errorf("the app waited %v for the error, want at most request_timeout + 3s = %v", r.Elapsed, limit)
	}
	d := p.waitAudit(t, "denied record", func(r audit.Record) bool { return r.Event == audit.EventDenied })
	if d.Reason != "credential unavailable" || d.SQLState != "08006" {
		t.Errorf("denied record: reason %q sqlstate %q, want \"credential unavailable\" 08006", d.Reason, d.SQLState)
	}

	// Vault returns: so does service, within credproxy's retry backoff (10s at most).
	v.restart(t)
	back := time.Now()
	deadline := back.Add(30 * time.Second)
	for {
		r := trySession(t, ctx, addr)
		if r.Err == nil {
			t.Logf("service back %v after Vault restarted, as %s", time.Since(back).Round(time.Millisecond), r.User)
			if r.User == cached {
				t.Errorf("after the restart the session ran as the expired role %q", cached)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after Vault restarted sessions still fail: %v", r.Err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// TestVaultShutdownRevokesLeases: at Close credproxy revokes every lease it
// holds, the current one and one rotated out that still has a session, and
// Vault drops their roles.
func TestVaultShutdownRevokesLeases(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	// Lease one is renewed at 26.7s (its sessions are open) only up to its
	// max_ttl, so new sessions then get lease two. Its sessions stay on it
	// until migrate_before its end, so Close meets both leases in use. On a
	// loaded machine the renewal and the read of lease two can each take
	// seconds (4.5s late seen with 30s leases): the test looks for lease
	// two until 5s before lease one ends, a second before the first
	// migration may start.
	const (
		ttl           = 40 * time.Second
		migrateBefore = 4 * time.Second
	)
	db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: ttl, MaxTTL: ttl})
	cfg := vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()})
	cfg.Postgres[0].Rotation.MigrateBefore = config.Duration(migrateBefore)
	p := startProxy(t, cfg)
	started := time.Now()
	ctx := testCtx(t, time.Minute)
	addr := p.addr(t, "appdb")

	var open []*pgx.Conn
	for range 3 {
		open = append(open, mustConnect(t, ctx, appDSN(addr)))
	}
	first := mustQueryString(t, ctx, open[0], "SELECT current_user")
	time.Sleep(time.Until(started.Add(ttl*2/3 + 500*time.Millisecond)))
	var second string
	for deadline := started.Add(ttl - migrateBefore - time.Second); ; {
		c := mustConnect(t, ctx, appDSN(addr))
		u := mustQueryString(t, ctx, c, "SELECT current_user")
		if u != first {
			second = u
			open = append(open, c)
			break
		}
		c.Close(ctx)
		if time.Now().After(deadline) {
			t.Fatalf("no second lease by %v: sessions still get %q", time.Since(started).Round(time.Millisecond), first)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if ids := v.leaseIDs(t, db.CredsPath()); len(ids) != 2 {
		t.Fatalf("Vault holds %d leases under %s before Close, want 2", len(ids), db.CredsPath())
	}
	t.Logf("leases in use at Close: %s (3 sessions) and %s (1)", first, second)

	if err := p.srv.Close(); err != nil {
		t.Errorf("proxy Close: %v", err)
	}
	if ids := v.leaseIDs(t, db.CredsPath()); len(ids) != 0 {
		t.Errorf("after Close Vault still holds %d leases under %s, want none", len(ids), db.CredsPath())
	}
	waitNoDynamicRoles(t, pg, 10*time.Second)
	for _, c := range open {
		if err := c.Ping(ctx); err == nil {
			t.Errorf("a session is still usable after Close")
		}
	}
}

// TestVaultColdCacheOneRead: 500 sessions arriving at once on a cold cache
// cause one Vault read. The cache is made cold by starting credproxy before
// the Vault role exists (its start-up fetch fails), then creating the role.
func TestVaultColdCacheOneRead(t *testing.T) {
	skipShort(t)
	t.Parallel()
	const sessions = 500
	pg := startVaultPG(t, pgtest.Options{MaxConnections: sessions + 100})
	v := startVault(t)
	db := v.setupDatabase(t, pg, nil)
	cfg := vaultProxyConfig(v, pg, tokenAuth(v.tokenFile(t, db)), config.VaultSecret{Path: db.CredsPath()})
	cfg.Postgres[0].ConnectTimeout = config.Duration(time.Minute)
	p := startProxy(t, cfg)
	if n := v.credsReads(t, db); n != 0 {
		t.Fatalf("%d successful creds reads before the role exists", n)
	}
	failedAtStart := v.responses(t, "read", db.CredsPath(), false)
	v.createRole(t, db, dbRole{DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour})
	// Past the retry backoff of the failed start-up fetch (1s).
	time.Sleep(1500 * time.Millisecond)

	ctx := testCtx(t, 3*time.Minute)
	// 500 upstream logins at once take their time on a loaded 2-core box
	// (each is a PostgreSQL fork): the clients wait as long as credproxy
	// does for its upstream, so a slow machine shows as slow, not failed.
	dsn := strings.Replace(appDSN(p.addr(t, "appdb")), "connect_timeout=15", "connect_timeout=60", 1)
	gate := make(chan struct{})
	results := make([]sessionResult, sessions)
	var wg sync.WaitGroup
	for i := range sessions {
		wg.Go(func() {
			<-gate
			results[i] = trySessionDSN(t, ctx, dsn)
		})
	}
	began := time.Now()
	close(gate)
	wg.Wait()
	elapsed := time.Since(began)

	users := map[string]int{}
	var failures []string
	for _, r := range results {
		if r.Err != nil {
			failures = append(failures, r.Err.Error())
			continue
		}
		users[r.User]++
	}
	reads := v.credsReads(t, db)
	fetches := metric(t, p, "credproxy_credential_fetch_seconds_count", map[string]string{"credential": "app-dynamic"})
	t.Logf("%d parallel sessions on a cold cache in %v: %d failed, %d distinct roles; Vault creds reads: %d ok (%d failed at start); credproxy fetches: %v",
		sessions, elapsed.Round(time.Millisecond), len(failures), len(users), reads, failedAtStart, fetches)
	if len(failures) > 0 {
		t.Errorf("%d of %d sessions failed, e.g. %s", len(failures), sessions, failures[0])
	}
	if reads != 1 {
		t.Errorf("Vault served %d creds reads for %d concurrent sessions, want 1", reads, sessions)
	}
	if len(users) != 1 {
		t.Errorf("sessions ran as %d different roles, want 1: %v", len(users), users)
	}
	if fetches != 2 {
		t.Errorf("credproxy_credential_fetch_seconds_count = %v, want 2 (the failed start-up fetch and one more)", fetches)
	}
}

// TestVaultAuth covers the login methods and the token's life: AppRole
// with token renewal, a token at its max TTL (log in again), a revoked
// token (403: log in again), a token file rewritten by its issuer, and JWT.
func TestVaultAuth(t *testing.T) {
	skipShort(t)
	t.Parallel()

	setup := func(t *testing.T) (*pgtest.Server, *testVault, dbEngine, string) {
		pg := startVaultPG(t, pgtest.Options{})
		v := startVault(t)
		db := v.setupDatabase(t, pg, &dbRole{DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour})
		return pg, v, db, v.credproxyPolicy(t, db, "")
	}

	t.Run("approle token renewed", func(t *testing.T) {
		t.Parallel()
		pg, v, db, policy := setup(t)
		auth := v.approle(t, policy, map[string]any{"token_ttl": "3s", "token_max_ttl": "1h"})
		p := startProxy(t, vaultProxyConfig(v, pg, auth, config.VaultSecret{Path: db.CredsPath()}))
		ctx := testCtx(t, time.Minute)
		users := sessionsFor(t, ctx, p.addr(t, "appdb"), 10*time.Second, time.Second)
		logins := v.responses(t, "update", "auth/"+auth.Mount+"/login", true)
		renewals := v.responses(t, "update", "auth/token/renew-self", true)
		t.Logf("10s on a 3s token: %d logins, %d token renewals, roles %v", logins, renewals, users)
		if logins != 1 {
			t.Errorf("%d AppRole logins, want 1: the token should have been renewed, not replaced", logins)
		}
		if renewals < 2 {
			t.Errorf("%d successful auth/token/renew-self in 10s of a 3s token, want at least 2", renewals)
		}
		if len(users) != 1 || v.credsReads(t, db) != 1 {
			t.Errorf("sessions ran as %v with %d creds reads; want one role from one read", users, v.credsReads(t, db))
		}
	})

	t.Run("approle token at max TTL", func(t *testing.T) {
		t.Parallel()
		pg, v, db, policy := setup(t)
		// Renewed at 4s, the token is capped at 13s by the renewal at 8s:
		// a new login every 8s or so, with 5s for sessions to move (less
		// fails on a busy machine, where PostgreSQL can stall for seconds).
		auth := v.approle(t, policy, map[string]any{"token_ttl": "6s", "token_max_ttl": "13s"})
		p := startProxy(t, vaultProxyConfig(v, pg, auth, config.VaultSecret{Path: db.CredsPath()}))
		ctx := testCtx(t, 2*time.Minute)
		// Vault revokes a token's leases when it expires, so credentials go
		// with each token: sessions get fresh ones (retry after refusal).
		users := sessionsFor(t, ctx, p.addr(t, "appdb"), 30*time.Second, time.Second)
		logins := v.responses(t, "update", "auth/"+auth.Mount+"/login", true)
		t.Logf("30s on tokens with max TTL 13s: %d logins, %d creds reads, %d roles", logins, v.credsReads(t, db), len(users))
		if logins < 3 {
			t.Errorf("%d AppRole logins in 30s with token_max_ttl 13s, want at least 3", logins)
		}
	})

	t.Run("revoked token", func(t *testing.T) {
		t.Parallel()
		pg, v, db, policy := setup(t)
		auth := v.approle(t, policy, map[string]any{"token_ttl": "1h"})
		p := startProxy(t, vaultProxyConfig(v, pg, auth, config.VaultSecret{Path: db.CredsPath()}))
		ctx := testCtx(t, time.Minute)
		addr := p.addr(t, "appdb")
		first := mustSession(t, ctx, addr, "before the revocation")
		// Revoke credproxy's token (found in Vault's raw audit log): Vault
		// revokes its leases too, so the next session needs a new read,
		// which Vault answers 403 until credproxy logs in again.
		var tokens []string
		for _, e := range v.auditEntries(t) {
			if e.Type == "response" && e.Request.Path == "auth/"+auth.Mount+"/login" && e.Response != nil && e.Response.Auth != nil {
				tokens = append(tokens, e.Response.Auth.ClientToken)
			}
		}
		if len(tokens) != 1 {
			t.Fatalf("found %d AppRole login tokens in Vault's audit log, want 1", len(tokens))
		}
		v.write(t, "auth/token/revoke", map[string]any{"token": tokens[0]})
		waitNoDynamicRoles(t, pg, 15*time.Second)
		if second := mustSession(t, ctx, addr, "after the revocation"); second == first {
			t.Errorf("the session after the revocation ran as the revoked role %q", first)
		}
		// At least 2: a lease revocation racing the fetch may see the 403
		// too (TestVaultConcurrent403OneLogin checks that those share one login).
		if logins := v.responses(t, "update", "auth/"+auth.Mount+"/login", true); logins < 2 {
			t.Errorf("%d AppRole logins, want 2 (start, and after the 403)", logins)
		}
		// Which request meets the 403 first depends on timing: the creds
		// read for the next session, the old lease's revocation, or the
		// token's renewal. Any of them leads to the one new login.
		refused := map[string]int{}
		for _, e := range v.auditEntries(t) {
			if e.Error != "" {
				refused[e.Request.Operation+" "+e.Request.Path]++
			}
		}
		if len(refused) == 0 {
			t.Errorf("no refused request in Vault's audit log: the 403 path was not taken")
		}
		t.Logf("refused by Vault after the revocation: %v", refused)
	})

	t.Run("token file rewritten", func(t *testing.T) {
		t.Parallel()
		pg, v, db, policy := setup(t)
		// A token that cannot be renewed and lives 4s; its issuer (Vault
		// Agent, say) writes the next one into the file after 1s.
		short := v.createToken(t, map[string]any{"policies": []string{policy}, "ttl": "4s", "renewable": false})
		file := writeSecretFile(t, "vault-token", short)
		p := startProxy(t, vaultProxyConfig(v, pg, tokenAuth(file), config.VaultSecret{Path: db.CredsPath()}))
		ctx := testCtx(t, time.Minute)
		addr := p.addr(t, "appdb")
		mustSession(t, ctx, addr, "first token")
		time.Sleep(time.Second)
		next := v.createToken(t, map[string]any{"policies": []string{policy}, "ttl": "1h", "renewable": true})
		replaceFile(t, file, next)
		sessionsFor(t, ctx, addr, 8*time.Second, time.Second)
		byNext, lookups := 0, 0
		for _, e := range v.auditEntries(t) {
			if e.Type != "response" {
				continue
			}
			if e.Request.ClientToken == next {
				byNext++
			}
			if e.Request.Path == "auth/token/lookup-self" && e.Request.ClientToken == short {
				lookups++
			}
		}
		t.Logf("requests with the new token: %d; lookup-self with the 4s token: %d", byNext, lookups)
		if byNext == 0 {
			t.Errorf("credproxy never used the token written to token_file after the first expired")
		}
		if lookups > 20 {
			t.Errorf("credproxy looked the non-renewable 4s token up %d times: it spins re-logging in near the token's end", lookups)
		}
	})

	t.Run("jwt", func(t *testing.T) {
		t.Parallel()
		pg, v, db, policy := setup(t)
		signer := vaulttest.NewSigner(t)
		mount := v.name("jwt")
		v.enableAuth(t, mount, "jwt")
		v.write(t, "auth/"+mount+"/config", map[string]any{
			"jwt_validation_pubkeys": []string{signer.PublicKeyPEM()},
			"bound_issuer":           "https://issuer.credproxy.test",
		})
		v.write(t, "auth/"+mount+"/role/credproxy", map[string]any{
			"role_type":       "jwt",
			"bound_audiences": []string{"credproxy"},
			"user_claim":      "sub",
			"token_policies":  []string{policy},
			"token_ttl":       "1h",
		})
		jwt := signer.Sign(t, vaulttest.JWTClaims("https://issuer.credproxy.test", "credproxy-sidecar", "credproxy", 10*time.Minute))
		leaks.addSecret("a JWT of "+t.Name(), jwt)
		auth := config.VaultAuth{Method: "jwt", Mount: mount, Role: "credproxy", JWTFile: writeSecretFile(t, "jwt", jwt)}
		p := startProxy(t, vaultProxyConfig(v, pg, auth, config.VaultSecret{Path: db.CredsPath()}))
		ctx := testCtx(t, time.Minute)
		mustSession(t, ctx, p.addr(t, "appdb"), "jwt login")
		if logins := v.responses(t, "update", "auth/"+mount+"/login", true); logins != 1 {
			t.Errorf("%d JWT logins, want 1", logins)
		}
	})
}

// TestVaultConcurrent403OneLogin: when Vault answers 403 to several
// requests at once (credproxy's token was revoked), credproxy logs in again
// once, not once per request, as VaultClient promises ("concurrent 403s
// cause one re-login"); with an AppRole secret id limited in uses, every
// extra login would burn one.
func TestVaultConcurrent403OneLogin(t *testing.T) {
	skipShort(t)
	t.Parallel()
	const parallel, rounds = 8, 3
	v := startVault(t)
	kv := v.name("kv1")
	v.mount(t, kv, &vault.MountInput{Type: "kv", Options: map[string]string{"version": "1"}})
	for i := range parallel {
		value := "v-" + randomHex(t, 8)
		leaks.addSecret("a KV value of "+t.Name(), value)
		v.write(t, fmt.Sprintf("%s/credproxy/s%d", kv, i), map[string]any{"value": value})
	}
	policy := v.name("kv-reader")
	if err := v.Client.Sys().PutPolicy(policy, fmt.Sprintf(`path "%s/credproxy/*" { capabilities = ["read"] }`, kv)); err != nil {
		t.Fatal(err)
	}
	auth := v.approle(t, policy, map[string]any{"token_ttl": "1h"})
	ctx := testCtx(t, time.Minute)
	vc, err := credentials.NewVaultClient(config.Vault{Address: v.Addr, CAFile: v.caFile,
		RequestTimeout: config.Duration(vaultRequestTimeout), Auth: auth},
		newLogger(leaks.stream(kindLog, t.Name()+" (vault client)")))
	if err != nil {
		t.Fatal(err)
	}
	vc.Start(ctx)
	t.Cleanup(vc.Close)
	sources := make([]*credentials.Vault, parallel)
	for i := range sources {
		sources[i] = credentials.NewVault(vc, config.VaultSecret{Path: fmt.Sprintf("%s/credproxy/s%d", kv, i), KVVersion: 1})
		if _, err := sources[i].Fetch(ctx); err != nil {
			t.Fatalf("fetch s%d: %v", i, err)
		}
	}
	loginPath := "auth/" + auth.Mount + "/login"
	for round := 1; round <= rounds; round++ {
		var token string
		for _, e := range v.auditEntries(t) {
			if e.Type == "response" && e.Request.Path == loginPath && e.Response != nil && e.Response.Auth != nil {
				token = e.Response.Auth.ClientToken
			}
		}
		v.write(t, "auth/token/revoke", map[string]any{"token": token})
		before := v.responses(t, "update", loginPath, true)
		gate := make(chan struct{})
		errs := make([]error, parallel)
		var wg sync.WaitGroup
		for i, src := range sources {
			wg.Go(func() {
				<-gate
				_, errs[i] = src.Fetch(ctx)
			})
		}
		close(gate)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("round %d: fetch s%d after the token was revoked: %v", round, i, err)
			}
		}
		// The token loop may still be acting on a queued request to log in.
		time.Sleep(500 * time.Millisecond)
		if n := v.responses(t, "update", loginPath, true) - before; n != 1 {
			t.Errorf("round %d: %d concurrent 403s caused %d logins, want 1", round, parallel, n)
		}
	}
}

// TestVaultKV reads KV v1 and v2 secrets through the vault source (fields,
// field_map, the data/ path of KV v2 added or not) and serves a Postgres
// service from a KV v2 username and password, re-read when they change.
func TestVaultKV(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startVaultPG(t, pgtest.Options{})
	v := startVault(t)
	kv2, kv1 := v.name("secret"), v.name("kv1")
	if v.prefix != "" { // a dev server has secret/ (KV v2) already
		v.mount(t, kv2, &vault.MountInput{Type: "kv", Options: map[string]string{"version": "2"}})
	}
	v.mount(t, kv1, &vault.MountInput{Type: "kv", Options: map[string]string{"version": "1"}})

	password, apiToken, apiToken1 := "kv-"+randomHex(t, 12), "tok-"+randomHex(t, 12), "tok1-"+randomHex(t, 12)
	leaks.addPassword("kv_app of "+t.Name(), "kv_app", password)
	leaks.addSecret("a KV value of "+t.Name(), apiToken)
	leaks.addSecret("a KV value of "+t.Name(), apiToken1)
	pg.ExecDB(t, pgtest.AppDB, "CREATE ROLE kv_app LOGIN PASSWORD '"+password+"'")
	v.write(t, kv2+"/data/credproxy/app", map[string]any{"data": map[string]any{"username": "kv_app", "password": password, "api_token": apiToken}})
	v.write(t, kv1+"/credproxy/app", map[string]any{"user": "kv_app", "pass": password, "api_token": apiToken1})
	if err := v.Client.Sys().PutPolicy(v.name("kv-reader"), fmt.Sprintf(`
path "%s/data/credproxy/*" { capabilities = ["read"] }
path "%s/credproxy/*" { capabilities = ["read"] }`, kv2, kv1)); err != nil {
		t.Fatal(err)
	}
	tokenFile := writeSecretFile(t, "vault-token", v.createToken(t, map[string]any{"policies": []string{v.name("kv-reader")}, "ttl": "1h"}))

	ctx := testCtx(t, time.Minute)
	vc, err := credentials.NewVaultClient(config.Vault{Address: v.Addr, CAFile: v.caFile,
		RequestTimeout: config.Duration(vaultRequestTimeout), Auth: tokenAuth(tokenFile)},
		newLogger(leaks.stream(kindLog, t.Name()+" (vault client)")))
	if err != nil {
		t.Fatal(err)
	}
	vc.Start(ctx)
	t.Cleanup(vc.Close)

	all2 := map[string]string{"username": "kv_app", "password": password, "api_token": apiToken}
	for _, tc := range []struct {
		name   string
		secret config.VaultSecret
		want   map[string]string
	}{
		{"kv2 path without data", config.VaultSecret{Path: kv2 + "/credproxy/app"}, all2},
		{"kv2 path with data", config.VaultSecret{Path: kv2 + "/data/credproxy/app"}, all2},
		{"kv2 kv_version 2", config.VaultSecret{Path: kv2 + "/credproxy/app", KVVersion: 2}, all2},
		{"kv2 field_map", config.VaultSecret{Path: kv2 + "/credproxy/app", FieldMap: map[string]string{"token": "api_token"}},
			map[string]string{"token": apiToken}},
		{"kv1", config.VaultSecret{Path: kv1 + "/credproxy/app"},
			map[string]string{"user": "kv_app", "pass": password, "api_token": apiToken1}},
		{"kv1 field_map", config.VaultSecret{Path: kv1 + "/credproxy/app", FieldMap: map[string]string{"username": "user", "password": "pass"}},
			map[string]string{"username": "kv_app", "password": password}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cred, err := credentials.NewVault(vc, tc.secret).Fetch(ctx)
			if err != nil {
				t.Fatalf("fetch %s: %v", tc.secret.Path, err)
			}
			if cred.Lease.Leased() {
				t.Errorf("a KV read has a lease: %v", cred.Lease)
			}
			got := map[string]string{}
			for k, s := range cred.Fields {
				got[k] = s.Reveal()
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("fields %v, want %v", cred.FieldNames(), keys(tc.want))
				for k, w := range tc.want {
					if got[k] != w {
						t.Errorf("field %q differs from what was written", k)
					}
				}
			}
		})
	}
	t.Run("field_map names a missing field", func(t *testing.T) {
		_, err := credentials.NewVault(vc, config.VaultSecret{Path: kv2 + "/credproxy/app", FieldMap: map[string]string{"password": "passwd"}}).Fetch(ctx)
		if err == nil || !strings.Contains(err.Error(), `"passwd"`) {
			t.Fatalf("error = %v, want one naming the missing field \"passwd\"", err)
		}
		leaks.add(kindClient, t.Name(), []byte(err.Error()))
	})

	t.Run("postgres service from KV v2", func(t *testing.T) {
		cfg := vaultProxyConfig(v, pg, tokenAuth(tokenFile), config.VaultSecret{Path: kv2 + "/credproxy/app",
			FieldMap: map[string]string{"username": "username", "password": "password"}, RefreshInterval: config.Duration(time.Second)})
		p := startProxy(t, cfg)
		addr := p.addr(t, "appdb")
		r := trySession(t, ctx, addr)
		if r.Err != nil || r.User != "kv_app" {
			t.Fatalf("session: user %q, error %v; want kv_app", r.User, r.Err)
		}
		// The password changes in PostgreSQL and in KV: credproxy's re-read
		// (every refresh_interval) picks it up.
		next := "kv-" + randomHex(t, 12)
		leaks.addPassword("kv_app of "+t.Name(), "kv_app", next)
		pg.ExecDB(t, pgtest.AppDB, "ALTER ROLE kv_app PASSWORD '"+next+"'")
		v.write(t, kv2+"/data/credproxy/app", map[string]any{"data": map[string]any{"username": "kv_app", "password": next, "api_token": apiToken}})
		deadline := time.Now().Add(15 * time.Second)
		for {
			r := trySession(t, ctx, addr)
			if r.Err == nil && r.User == "kv_app" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("15s after the KV password changed sessions still fail: %v", r.Err)
			}
			time.Sleep(250 * time.Millisecond)
		}
		start := p.waitAudit(t, "session_start", func(r audit.Record) bool { return r.Event == audit.EventSessionStart })
		if start.Credential != "app-dynamic" || start.DBUser != "kv_app" || start.Lease != nil {
			t.Errorf("session_start credential %q db_user %q lease %+v; want app-dynamic, kv_app, no lease", start.Credential, start.DBUser, start.Lease)
		}
	})
}
