package integration

// The "operable in production" tests: metrics, readiness, live reload,
// graceful shutdown, logging and the command line's exit codes. The
// in-process tests use startProxy; the others run the credproxy binary as
// an operator would, with a YAML config, signals and the admin endpoints.
// Every test is parallel, so none runs during the heap measurement of
// TestCopyStreamsWithBoundedMemory.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/integration/vaulttest"
	"github.com/credproxy/credproxy/proxy/audit"
)

// TestOpsMetrics runs scripted sessions through an in-process proxy and
// checks what /metrics says about them against the audit log.
func TestOpsMetrics(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	const wrong = "ops-metrics-wrong-password-5b1e0c"
	cfg := &config.Config{
		Admin: &config.Admin{Listen: "127.0.0.1:0"},
		Secrets: map[string]config.Secret{
			"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser)),
			"bad": staticSecret(pgtest.ScramUser, wrong),
		},
		Postgres: []config.Postgres{
			pgService("app", pg.Addr(), "app", config.PostgresTLS{}),
			pgService("bad", pg.Addr(), "bad", config.PostgresTLS{}),
		},
	}
	p := startProxy(t, cfg)
	base := "http://" + p.srv.AdminAddr().String()
	ctx := testCtx(t, time.Minute)
	app := map[string]string{"protocol": "postgres", "service": "app"}
	with := func(m map[string]string, kv ...string) map[string]string {
		out := map[string]string{}
		for k, v := range m {
			out[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}
	active := func() float64 {
		v, _ := opsScrape(t, base).value("credproxy_sessions_active", app)
		return v
	}
	if v := active(); v != 0 {
		t.Fatalf("credproxy_sessions_active = %v before any session", v)
	}

	// Three sessions that run known queries; the first is checked while open.
	var clientAddrs []string
	queries := []string{"SELECT 1", "SELECT repeat('x', 10000)", "SELECT count(*) FROM generate_series(1, 1000)"}
	for i := range 3 {
		conn := mustConnect(t, ctx, appDSN(p.addr(t, "app")))
		clientAddrs = append(clientAddrs, conn.PgConn().Conn().LocalAddr().String())
		if i == 0 {
			opsWaitFor(t, 10*time.Second, "credproxy_sessions_active == 1 with one session open", func() error {
				if v := active(); v != 1 {
					return fmt.Errorf("credproxy_sessions_active = %v", v)
				}
				return nil
			})
		}
		for _, q := range queries {
			if _, err := conn.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, clientErr(t, err))
			}
		}
		if err := conn.Close(ctx); err != nil {
			t.Fatalf("close: %v", err)
		}
	}
	// One refused: the upstream rejects the injected (wrong) password.
	if conn, err := connect(t, ctx, appDSN(p.addr(t, "bad"))); err == nil {
		conn.Close(ctx)
		t.Fatal("connected with a wrong injected password")
	} else if code := pgError(t, err).Code; code != "28P01" {
		t.Fatalf("denied session: SQLSTATE %s, want 28P01", code)
	}

	// Bytes agree with the audit log's session_end records, which are
	// written before a session's end reaches the metrics.
	var in, out int64
	opsWaitFor(t, 10*time.Second, "three session_end records for app", func() error {
		var ends int
		in, out = 0, 0
		for _, r := range p.auditRecords(t) {
			if r.Event == audit.EventSessionEnd && r.Service == "app" {
				ends++
				if r.BytesIn == nil || r.BytesOut == nil {
					t.Fatalf("session_end without bytes: %+v", r)
				}
				in += *r.BytesIn
				out += *r.BytesOut
			}
		}
		if ends != 3 {
			return fmt.Errorf("%d records", ends)
		}
		return nil
	})
	if in == 0 || out < 10000 {
		t.Fatalf("audit: session_end bytes in %d out %d; want in > 0, out >= 10000", in, out)
	}
	var m opsMetricSet
	opsWaitFor(t, 10*time.Second, "every session's end in the metrics, bytes as in the audit log", func() error {
		m = opsScrape(t, base)
		ok, _ := m.value("credproxy_sessions_total", with(app, "result", "ok"))
		act, _ := m.value("credproxy_sessions_active", app)
		bin, _ := m.value("credproxy_bytes_total", with(app, "direction", "in"))
		bout, _ := m.value("credproxy_bytes_total", with(app, "direction", "out"))
		// The app sees its FATAL before the refusal is counted, and a
		// scrape is no atomic snapshot: wait for both counters.
		denied, _ := m.value("credproxy_sessions_total", map[string]string{"service": "bad", "result": "denied"})
		refused, _ := m.value("credproxy_auth_failures_total", nil)
		if ok != 3 || act != 0 || bin != float64(in) || bout != float64(out) || denied < 1 || refused < 1 {
			return fmt.Errorf("sessions_total{result=ok} = %v (want 3), sessions_active = %v (want 0), "+
				"bytes_total in %v out %v (audit session_end sums: in %d out %d), "+
				"sessions_total{service=bad,result=denied} = %v and auth_failures_total = %v (want 1)",
				ok, act, bin, bout, in, out, denied, refused)
		}
		return nil
	})

	expect := func(what string, got, want float64) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %v, want %v", what, got, want)
		}
	}
	v, _ := m.value("credproxy_sessions_total", map[string]string{"protocol": "postgres", "service": "bad", "result": "denied"})
	expect(`credproxy_sessions_total{service="bad",result="denied"}`, v, 1)
	v, _ = m.value("credproxy_sessions_total", with(app, "result", "error"))
	expect(`credproxy_sessions_total{service="app",result="error"}`, v, 0)
	v, _ = m.value("credproxy_auth_failures_total", map[string]string{"kind": "upstream_auth"})
	expect(`credproxy_auth_failures_total{kind="upstream_auth"}`, v, 1)
	v, _ = m.value("credproxy_auth_failures_total", nil)
	expect("credproxy_auth_failures_total (all kinds)", v, 1)

	v, _ = m.value("credproxy_bytes_total", with(app, "direction", "in"))
	expect(`credproxy_bytes_total{direction="in"} (audit sum of bytes_in)`, v, float64(in))
	v, _ = m.value("credproxy_bytes_total", with(app, "direction", "out"))
	expect(`credproxy_bytes_total{direction="out"} (audit sum of bytes_out)`, v, float64(out))

	if n, _ := m.count("credproxy_upstream_connect_seconds", app); n != 3 {
		t.Errorf(`credproxy_upstream_connect_seconds_count{service="app"} = %d, want 3 (one per login)`, n)
	}
	if n, _ := m.count("credproxy_upstream_connect_seconds", map[string]string{"service": "bad"}); n != 0 {
		t.Errorf(`credproxy_upstream_connect_seconds_count{service="bad"} = %d, want 0 (no login succeeded)`, n)
	}
	if n, _ := m.count("credproxy_session_duration_seconds", app); n != 3 {
		t.Errorf(`credproxy_session_duration_seconds_count{service="app"} = %d, want 3`, n)
	}
	for _, cred := range []string{"app", "bad"} {
		if n, _ := m.count("credproxy_credential_fetch_seconds", map[string]string{"credential": cred}); n < 1 {
			t.Errorf(`credproxy_credential_fetch_seconds_count{credential=%q} = %d, want >= 1`, cred, n)
		}
	}

	// Readiness as a metric says what /readyz would say, whether or not
	// anything has asked /readyz (nothing has here): the CredproxyNotReady
	// alert in deploy/monitoring fires on credproxy_ready == 0.
	if v, found := m.value("credproxy_ready", nil); !found || v != 1 {
		t.Errorf("credproxy_ready = %v (present %v) while the proxy is ready and /readyz was never requested; want 1", v, found)
	}

	// The standard collectors, and the naming conventions of ours.
	var goFams, procFams int
	for name, f := range m.fams {
		switch {
		case strings.HasPrefix(name, "go_"):
			goFams++
		case strings.HasPrefix(name, "process_"):
			procFams++
		case strings.HasPrefix(name, "credproxy_"):
			typ := f.GetType().String()
			if strings.HasSuffix(name, "_total") && typ != "COUNTER" || strings.HasSuffix(name, "_seconds") && typ != "HISTOGRAM" {
				t.Errorf("%s has type %s", name, typ)
			}
		}
	}
	if goFams == 0 || procFams == 0 || m.fams["go_goroutines"] == nil || m.fams["process_resident_memory_bytes"] == nil {
		t.Errorf("/metrics has %d go_* and %d process_* families; want the Go and process collectors", goFams, procFams)
	}

	// Nothing on the page names a password, a user or a client.
	forbidden := map[string]string{
		"the role's password":    pg.Password(pgtest.ScramUser),
		"the wrong password":     wrong,
		"the injected username":  pgtest.ScramUser,
		"the app's user name":    "app_user",
		"a loopback address":     "127.0.0.1",
		"the upstream's address": pg.Addr(),
	}
	ports := map[string]bool{}
	for i, a := range clientAddrs {
		forbidden[fmt.Sprintf("client %d's address", i)] = a
		_, port, _ := net.SplitHostPort(a)
		ports[port] = true
	}
	for _, lv := range m.labelValues() {
		for what, s := range forbidden {
			if strings.Contains(lv, s) {
				t.Errorf("/metrics label %s contains %s", lv, what)
			}
		}
		if i := strings.Index(lv, "=\""); i >= 0 && ports[strings.Trim(lv[i+1:], `"}`)] {
			t.Errorf("/metrics label %s is a client's port", lv)
		}
	}
	for what, s := range forbidden {
		if strings.Contains(m.text, s) {
			t.Errorf("/metrics text contains %s", what)
		}
	}
}

// TestOpsReadiness: /healthz is always 200; /readyz is 503 (naming the
// cause) while a credential source fails and while draining.
func TestOpsReadiness(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	user, password := pgtest.ScramUser, pg.Password(pgtest.ScramUser)
	admin := &config.Admin{Listen: "127.0.0.1:0"}
	probe := func(t *testing.T, p *proxyHarness, path string) (int, string) {
		t.Helper()
		code, body, err := opsGet("http://" + p.srv.AdminAddr().String() + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		leaks.add(kindOutput, t.Name()+": "+path, []byte(body))
		return code, body
	}
	// waitReady polls /readyz for up to d and returns its last answer.
	waitReady := func(t *testing.T, p *proxyHarness, d time.Duration) (int, string) {
		t.Helper()
		deadline := time.Now().Add(d)
		for {
			code, body := probe(t, p, "/readyz")
			if code == http.StatusOK || time.Now().After(deadline) {
				return code, body
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// connectEventually retries for up to 10s: a source that recovered is
	// used again within its retry backoff.
	connectEventually := func(t *testing.T, ctx context.Context, addr string) *pgx.Conn {
		t.Helper()
		var conn *pgx.Conn
		opsWaitFor(t, 10*time.Second, "a session through the recovered source", func() error {
			var err error
			conn, err = connect(t, ctx, appDSN(addr))
			return err
		})
		return conn
	}

	t.Run("EnvSecretUnset", func(t *testing.T) {
		t.Parallel()
		suffix := fmt.Sprintf("%d", time.Now().UnixNano())
		userVar, pwVar := "CREDPROXY_OPS_READY_USER_"+suffix, "CREDPROXY_OPS_READY_PW_"+suffix
		// Not t.Setenv: the test is parallel. The names are ours alone.
		t.Cleanup(func() { os.Unsetenv(userVar); os.Unsetenv(pwVar) })
		cfg := &config.Config{
			Admin:    admin,
			Secrets:  map[string]config.Secret{"app-env": {Env: map[string]string{"username": userVar, "password": pwVar}}},
			Postgres: []config.Postgres{pgService("app", pg.Addr(), "app-env", config.PostgresTLS{})},
		}
		p := startProxy(t, cfg)
		if code, _ := probe(t, p, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz = %d, want 200", code)
		}
		code, body := probe(t, p, "/readyz")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, `credential "app-env"`) ||
			!(strings.Contains(body, userVar) || strings.Contains(body, pwVar)) {
			t.Errorf("/readyz with the variables unset = %d %q; want 503 naming credential \"app-env\" and the variable", code, body)
		}
		t.Logf("/readyz said: %d %q", code, body)

		os.Setenv(userVar, user)
		os.Setenv(pwVar, password)
		// No session arrives meanwhile: like a pod that gets no traffic
		// until it is ready, readiness must recover on its own.
		if code, body := waitReady(t, p, 15*time.Second); code != http.StatusOK {
			t.Errorf("/readyz = %d %q 15s after the variables were set, with no session meanwhile; want 200: "+
				"readiness must recover without traffic (a pod that is not ready gets none)", code, body)
		}
		ctx := testCtx(t, 30*time.Second)
		conn := connectEventually(t, ctx, p.addr(t, "app"))
		if got := mustQueryString(t, ctx, conn, "SELECT current_user"); got != user {
			t.Errorf("current_user = %q, want %q", got, user)
		}
		if code, body := probe(t, p, "/readyz"); code != http.StatusOK {
			t.Errorf("/readyz after a session succeeded = %d %q, want 200", code, body)
		}
	})

	t.Run("VaultDown", func(t *testing.T) {
		t.Parallel()
		vs := vaulttest.Start(t, vaulttest.Options{})
		leaks.addSecret("the vault root token of "+t.Name(), vs.RootToken())
		if _, err := vs.Client(t).Logical().Write("secret/data/ops", map[string]any{
			"data": map[string]any{"username": user, "password": password},
		}); err != nil {
			t.Fatalf("write KV secret: %v", err)
		}
		tokenFile := t.TempDir() + "/vault-token"
		if err := os.WriteFile(tokenFile, []byte(vs.RootToken()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		vs.Stop()
		cfg := &config.Config{
			Admin: admin,
			Vault: &config.Vault{Address: vs.URL(), RequestTimeout: config.Duration(time.Second),
				Auth: config.VaultAuth{Method: "token", TokenFile: tokenFile}},
			Secrets:  map[string]config.Secret{"app-vault": {Vault: &config.VaultSecret{Path: "secret/data/ops"}}},
			Postgres: []config.Postgres{pgService("app", pg.Addr(), "app-vault", config.PostgresTLS{})},
		}
		p := startProxy(t, cfg)
		if code, _ := probe(t, p, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz = %d, want 200", code)
		}
		code, body := probe(t, p, "/readyz")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, `credential "app-vault"`) || !strings.Contains(strings.ToLower(body), "vault") {
			t.Errorf("/readyz with Vault down = %d %q; want 503 naming credential \"app-vault\" and Vault", code, body)
		}
		t.Logf("/readyz said: %d %q", code, body)
		ctx := testCtx(t, time.Minute)
		if _, err := connect(t, ctx, appDSN(p.addr(t, "app"))); err == nil {
			t.Fatal("a session started with Vault down and nothing cached")
		} else if pgErr := pgError(t, err); pgErr.Code != "08006" || !strings.Contains(pgErr.Message, `credential "app-vault" unavailable`) {
			t.Errorf("with Vault down the app saw %s %q; want 08006 credential \"app-vault\" unavailable", pgErr.Code, pgErr.Message)
		}

		if err := vs.Restart(); err != nil {
			t.Fatal(err)
		}
		if code, body := waitReady(t, p, 20*time.Second); code != http.StatusOK {
			t.Errorf("/readyz = %d %q 20s after Vault came back, with no session meanwhile; want 200: "+
				"readiness must recover without traffic", code, body)
		}
		conn := connectEventually(t, ctx, p.addr(t, "app"))
		if got := mustQueryString(t, ctx, conn, "SELECT current_user"); got != user {
			t.Errorf("current_user = %q, want %q", got, user)
		}
		if code, body := probe(t, p, "/readyz"); code != http.StatusOK {
			t.Errorf("/readyz after a session succeeded = %d %q, want 200", code, body)
		}
	})

	t.Run("Draining", func(t *testing.T) {
		t.Parallel()
		cfg := &config.Config{
			Admin:    admin,
			Secrets:  map[string]config.Secret{"app": staticSecret(user, password)},
			Postgres: []config.Postgres{pgService("app", pg.Addr(), "app", config.PostgresTLS{})},
		}
		p := startProxy(t, cfg)
		ctx := testCtx(t, time.Minute)
		conn := mustConnect(t, ctx, appDSN(p.addr(t, "app")))
		mustQueryString(t, ctx, conn, "SELECT 'open'")
		if code, body := probe(t, p, "/readyz"); code != http.StatusOK {
			t.Fatalf("/readyz before shutdown = %d %q", code, body)
		}

		start := time.Now()
		done := make(chan error, 1)
		go func() { done <- p.srv.Shutdown(context.Background(), 10*time.Second) }()
		var code int
		var body string
		for {
			code, body = probe(t, p, "/readyz")
			if code != http.StatusOK || time.Since(start) > 2*time.Second {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(start)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "draining") {
			t.Fatalf("/readyz during shutdown = %d %q after %v; want 503 saying draining", code, body, took)
		}
		if took > time.Second {
			t.Errorf("/readyz turned 503 only %v after Shutdown began; want at once", took)
		}
		t.Logf("/readyz turned 503 %v after Shutdown began: %q", took.Round(time.Millisecond), body)
		if code, _ := probe(t, p, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz while draining = %d, want 200", code)
		}
		// Still draining: the open session works, and readiness stays off.
		if got := mustQueryString(t, ctx, conn, "SELECT 'still open'"); got != "still open" {
			t.Errorf("session during drain: %q", got)
		}
		if code, _ := probe(t, p, "/readyz"); code != http.StatusServiceUnavailable {
			t.Errorf("/readyz later in the drain = %d, want 503", code)
		}
		conn.Close(ctx)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		case <-time.After(8 * time.Second):
			t.Fatal("Shutdown did not return after the last session ended")
		}
	})
}

// opsPGYAML renders one postgres service entry.
func opsPGYAML(name, listen, upstream, credential, database string) string {
	y := fmt.Sprintf("  - name: %s\n    listen: %s\n    upstream: %s\n    credentials: %s\n    tls: {mode: disable}\n",
		name, listen, upstream, credential)
	if database != "" {
		y += "    database: " + database + "\n"
	}
	return y
}

// opsHeader renders shutdown_grace, admin and audit.
func opsHeader(p *opsProc, grace string) string {
	return fmt.Sprintf("shutdown_grace: %s\nadmin:\n  listen: %s\naudit:\n  path: ./audit.jsonl\n", grace, p.addr("admin"))
}

// opsWriteSecret writes a password file as an operator would (0600,
// trailing newline).
func opsWriteSecret(t *testing.T, path, value string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(value+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// opsStaticProc is a credproxy process with one static secret for user read
// from app.pw and one postgres service "app" on pg.
func opsStaticProc(t *testing.T, pg *pgtest.Server, user, grace string) *opsProc {
	t.Helper()
	p := newOpsProc(t, func(p *opsProc) string {
		return opsHeader(p, grace) + fmt.Sprintf("secrets:\n  app:\n    static:\n      username: %s\n      password_file: ./app.pw\npostgres:\n", user) +
			opsPGYAML("app", p.addr("app"), pg.Addr(), "app", "")
	})
	opsWriteSecret(t, p.path("app.pw"), pg.Password(user))
	return p
}

// opsReloads returns credproxy_config_reloads_total{result}.
func opsReloads(p *opsProc, result string) float64 {
	v, _ := p.metrics().value("credproxy_config_reloads_total", map[string]string{"result": result})
	return v
}

// opsWaitReloads waits until credproxy_config_reloads_total{result} == n.
func opsWaitReloads(t *testing.T, p *opsProc, result string, n float64) {
	t.Helper()
	opsWaitFor(t, 10*time.Second, fmt.Sprintf("config_reloads_total{result=%q} == %v", result, n), func() error {
		if v := opsReloads(p, result); v != n {
			return fmt.Errorf("it is %v", v)
		}
		return nil
	})
}

// TestOpsReloadKeepsOpenSession changes a service (its pinned database) and
// adds one with SIGHUP while a query runs: the query completes, new
// sessions see the change.
func TestOpsReloadKeepsOpenSession(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	pin, second := pgtest.AppDB, false
	p := newOpsProc(t, func(p *opsProc) string {
		y := opsHeader(p, "10s") + fmt.Sprintf("secrets:\n  app:\n    static:\n      username: %s\n      password_file: ./app.pw\npostgres:\n", pgtest.ScramUser) +
			opsPGYAML("app", p.addr("app"), pg.Addr(), "app", pin)
		if second {
			y += opsPGYAML("second", p.addr("second"), pg.Addr(), "app", "")
		}
		return y
	})
	opsWriteSecret(t, p.path("app.pw"), pg.Password(pgtest.ScramUser))
	p.start()
	ctx := testCtx(t, time.Minute)

	conn := mustConnect(t, ctx, appDSN(p.addr("app")))
	if got := mustQueryString(t, ctx, conn, "SELECT current_database()"); got != pgtest.AppDB {
		t.Fatalf("current_database() = %q, want the pinned %q", got, pgtest.AppDB)
	}
	clientAddr := conn.PgConn().Conn().LocalAddr().String()
	start := time.Now()
	res := make(chan error, 1)
	running := make(chan struct{})
	t.Cleanup(func() { <-running }) // before the connection's Close
	go func() {
		defer close(running)
		_, err := conn.Exec(ctx, "SELECT pg_sleep(3)")
		res <- err
	}()
	time.Sleep(500 * time.Millisecond)

	pin, second = "postgres", true
	p.writeConfig()
	p.signal(syscall.SIGHUP)
	opsWaitReloads(t, p, "ok", 1)
	select {
	case err := <-res:
		t.Fatalf("pg_sleep(3) ended (%v) before the reload was applied: the test did not reload mid-query", err)
	default:
	}
	line := p.waitLog("config reloaded", 1)
	if line["listeners_changed"] != 1.0 || line["listeners_added"] != 1.0 || line["listeners_removed"] != 0.0 {
		t.Errorf("config reloaded line = %v; want listeners_changed 1, listeners_added 1, listeners_removed 0", line)
	}

	if err := <-res; err != nil {
		t.Fatalf("the query running across the reload: %v", clientErr(t, err))
	}
	if took := time.Since(start); took < 3*time.Second {
		t.Errorf("pg_sleep(3) returned after %v", took)
	}
	if got := mustQueryString(t, ctx, conn, "SELECT current_database()"); got != pgtest.AppDB {
		t.Errorf("the open session's database changed to %q", got)
	}

	fresh := mustConnect(t, ctx, appDSN(p.addr("app")))
	if got := mustQueryString(t, ctx, fresh, "SELECT current_database()"); got != "postgres" {
		t.Errorf("a new session after the reload: current_database() = %q, want the new pin \"postgres\"", got)
	}
	added := mustConnect(t, ctx, appDSN(p.addr("second")))
	if got := mustQueryString(t, ctx, added, "SELECT current_database()"); got != pgtest.AppDB {
		t.Errorf("the added service: current_database() = %q, want %q", got, pgtest.AppDB)
	}
	if v := opsReloads(p, "error"); v != 0 {
		t.Errorf(`config_reloads_total{result="error"} = %v, want 0`, v)
	}
	conn.Close(ctx)
	opsWaitFor(t, 10*time.Second, "session_end of the session that crossed the reload", func() error {
		for _, r := range p.auditRecords() {
			if r.Event == audit.EventSessionEnd && r.Client.Addr == clientAddr {
				if deref(r.Error) != "" {
					t.Errorf("its session_end error = %q, want empty", deref(r.Error))
				}
				return nil
			}
		}
		return errors.New("none yet")
	})
}

// TestOpsReloadRejectsBrokenConfig sends SIGHUP after writing configs that
// cannot be used; each is rejected with a log line and a metric, and the
// running config keeps serving.
func TestOpsReloadRejectsBrokenConfig(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "10s")
	p.start()
	ctx := testCtx(t, time.Minute)
	open := mustConnect(t, ctx, appDSN(p.addr("app")))
	good, err := os.ReadFile(p.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	held, err := net.Listen("tcp", "127.0.0.1:0") // an address the new config cannot bind
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	cases := []struct {
		name   string
		config string
		want   string // in the rejection's log line
	}{
		{"invalid-yaml", string(good) + "postgres: [unclosed\n", "yaml"},
		{"unknown-key", string(good) + "bogus_key: true\n", "bogus_key"},
		{"listener-cannot-bind", string(good) + opsPGYAML("taken", held.Addr().String(), pg.Addr(), "app", ""), "address already in use"},
	}
	for i, c := range cases {
		opsWriteAtomic(t, p.cfgPath, []byte(c.config))
		p.signal(syscall.SIGHUP)
		opsWaitReloads(t, p, "error", float64(i+1))
		line := p.waitLog("config reload rejected", i+1)
		if text := fmt.Sprint(line); !strings.Contains(text, c.want) {
			t.Errorf("%s: rejection logged as %v; want it to mention %q", c.name, line, c.want)
		}
		if line.Level() != "error" {
			t.Errorf("%s: rejection logged at level %q, want error", c.name, line.Level())
		}
		if code, body, _ := opsGet(p.adminURL() + "/readyz"); code != http.StatusOK {
			t.Errorf("%s: /readyz = %d %q after the rejected reload", c.name, code, body)
		}
		conn := mustConnect(t, ctx, appDSN(p.addr("app")))
		if got := mustQueryString(t, ctx, conn, "SELECT 'served after "+c.name+"'"); got != "served after "+c.name {
			t.Errorf("%s: new session: %q", c.name, got)
		}
		conn.Close(ctx)
		if got := mustQueryString(t, ctx, open, "SELECT 'open'"); got != "open" {
			t.Errorf("%s: open session: %q", c.name, got)
		}
	}
	if v := opsReloads(p, "ok"); v != 0 {
		t.Errorf(`config_reloads_total{result="ok"} = %v after only broken configs, want 0`, v)
	}
	// A good config is still applied afterwards.
	opsWriteAtomic(t, p.cfgPath, good)
	p.signal(syscall.SIGHUP)
	opsWaitReloads(t, p, "ok", 1)
}

// TestOpsReloadWhileProbed reloads again and again while /readyz and
// /metrics are scraped: readiness stays 200 throughout, and the -race
// binary reports no race between a reload and the probes.
func TestOpsReloadWhileProbed(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "10s")
	p.start()

	stop := make(chan struct{})
	var probes sync.WaitGroup
	var mu sync.Mutex
	answers := map[string]int{}
	for _, path := range []string{"/readyz", "/metrics"} {
		probes.Add(1)
		go func() {
			defer probes.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				code, _, err := opsGet(p.adminURL() + path)
				mu.Lock()
				answers[fmt.Sprintf("%s %d %v", path, code, err)]++
				mu.Unlock()
			}
		}()
	}
	ctx := testCtx(t, time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr("app")))
	const n = 10
	for i := 1; i <= n; i++ {
		// Alternate the pinned database, so that each reload changes a service.
		cfg, err := os.ReadFile(p.cfgPath)
		if err != nil {
			t.Fatal(err)
		}
		text := strings.Replace(string(cfg), "    database: postgres\n", "", 1)
		if i%2 == 1 {
			text += "    database: postgres\n"
		}
		opsWriteAtomic(t, p.cfgPath, []byte(text))
		p.signal(syscall.SIGHUP)
		opsWaitReloads(t, p, "ok", float64(i))
		if got := mustQueryString(t, ctx, conn, "SELECT 'across reloads'"); got != "across reloads" {
			t.Errorf("the session open across the reloads: %q", got)
		}
	}
	conn.Close(ctx)
	close(stop)
	probes.Wait()
	for a, count := range answers {
		if !strings.HasPrefix(a, "/readyz 200 ") && !strings.HasPrefix(a, "/metrics 200 ") {
			t.Errorf("%d probes answered %s during the reloads; want only 200", count, a)
		}
	}
	t.Logf("probe answers during %d reloads: %v", n, answers)
	p.signal(syscall.SIGTERM)
	if code, ok := p.wait(10 * time.Second); !ok || code != 0 {
		t.Errorf("after SIGTERM: exited %v, code %d; want exit 0 (66 is the race detector's)", ok, code)
	}
}

// TestOpsReloadRotatedPasswordFile rotates a role's password in the
// database and then in its password_file, plain (written to a temp file
// and renamed) and in a Kubernetes Secret volume (the ..data symlink
// swap): new sessions fail until credproxy rereads the files, on SIGHUP or
// on its own with --watch.
func TestOpsReloadRotatedPasswordFile(t *testing.T) {
	opsBinaryTest(t)
	for _, mode := range []string{"SIGHUP", "Watch"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			pg := startPG(t, pgtest.Options{})
			p := newOpsProc(t, func(p *opsProc) string {
				return opsHeader(p, "10s") + fmt.Sprintf(`secrets:
  plain:
    static:
      username: %s
      password_file: ./plain.pw
  k8s:
    static:
      username: %s
      password_file: ./k8s/password
postgres:
`, pgtest.ScramUser, pgtest.MD5User) +
					opsPGYAML("plain", p.addr("plain"), pg.Addr(), "plain", "") +
					opsPGYAML("k8s", p.addr("k8s"), pg.Addr(), "k8s", "")
			})
			opsWriteSecret(t, p.path("plain.pw"), pg.Password(pgtest.ScramUser))
			k8s := newOpsK8sDir(t, p.path("k8s"), map[string]string{"password": pg.Password(pgtest.MD5User)})
			var args []string
			if mode == "Watch" {
				args = append(args, "--watch")
			}
			p.start(args...)
			ctx := testCtx(t, time.Minute)
			services := map[string]string{"plain": pgtest.ScramUser, "k8s": pgtest.MD5User}
			for svc, role := range services {
				conn := mustConnect(t, ctx, appDSN(p.addr(svc)))
				if got := mustQueryString(t, ctx, conn, "SELECT current_user"); got != role {
					t.Fatalf("%s: current_user = %q", svc, got)
				}
				conn.Close(ctx)
			}
			open := mustConnect(t, ctx, appDSN(p.addr("plain")))

			// Rotate in the database: credproxy still injects the old passwords.
			newPW := map[string]string{"plain": "rotated-" + opsRandomToken(t), "k8s": "rotated-" + opsRandomToken(t)}
			for svc, role := range services {
				leaks.addPassword(fmt.Sprintf("rotated %s of %s", role, t.Name()), role, newPW[svc])
			}
			pg.Exec(t, fmt.Sprintf("ALTER ROLE %s PASSWORD '%s'", pgtest.ScramUser, newPW["plain"]))
			pg.Exec(t, fmt.Sprintf("SET password_encryption = 'md5'; ALTER ROLE %s PASSWORD '%s'", pgtest.MD5User, newPW["k8s"]))
			for svc := range services {
				_, err := connect(t, ctx, appDSN(p.addr(svc)))
				if err == nil {
					t.Fatalf("%s: connected with the old password after the rotation", svc)
				}
				if code := pgError(t, err).Code; code != "28P01" {
					t.Errorf("%s: SQLSTATE %s after the rotation, want 28P01", svc, code)
				}
			}

			// Rotate the files, one at a time, so that each one's change is
			// seen on its own: first the Kubernetes volume, then the plain file.
			for i, svc := range []string{"k8s", "plain"} {
				before := opsReloads(p, "ok")
				if svc == "k8s" {
					k8s.update(t, map[string]string{"password": newPW[svc]})
				} else {
					opsWriteAtomic(t, p.path("plain.pw"), []byte(newPW[svc]+"\n"))
				}
				if mode == "SIGHUP" {
					// Without --watch nothing changes until the signal.
					time.Sleep(500 * time.Millisecond)
					if _, err := connect(t, ctx, appDSN(p.addr(svc))); err == nil {
						t.Errorf("%s: the rotated file was used before SIGHUP, without --watch", svc)
					}
					p.signal(syscall.SIGHUP)
					opsWaitReloads(t, p, "ok", float64(i+1))
				} else {
					opsWaitFor(t, 15*time.Second, svc+": a reload triggered by --watch", func() error {
						if v := opsReloads(p, "ok"); v <= before {
							return fmt.Errorf("config_reloads_total{result=ok} = %v", v)
						}
						return nil
					})
				}
				var conn *pgx.Conn
				opsWaitFor(t, 10*time.Second, svc+": a session with the rotated password", func() error {
					var err error
					conn, err = connect(t, ctx, appDSN(p.addr(svc)))
					return err
				})
				if got := mustQueryString(t, ctx, conn, "SELECT current_user"); got != services[svc] {
					t.Errorf("%s: current_user = %q", svc, got)
				}
				conn.Close(ctx)
				if svc == "k8s" {
					if _, err := connect(t, ctx, appDSN(p.addr("plain"))); err == nil {
						t.Errorf("plain: connected before its file was rotated")
					}
				}
			}
			if got := mustQueryString(t, ctx, open, "SELECT 'opened before the rotation'"); got != "opened before the rotation" {
				t.Errorf("the session opened before the rotation: %q", got)
			}
			if v := opsReloads(p, "error"); v != 0 {
				t.Errorf(`config_reloads_total{result="error"} = %v, want 0`, v)
			}
		})
	}
}

// TestOpsShutdownDrains sends SIGTERM while a 20 MB COPY FROM STDIN and a
// pg_sleep(2) run: both finish, readiness and the listener go at once, and
// the process exits 0 as soon as its sessions have ended.
func TestOpsShutdownDrains(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "10s")
	p.start()
	ctx := testCtx(t, 2*time.Minute)
	copyConn := mustConnect(t, ctx, appDSN(p.addr("app")))
	sleepConn := mustConnect(t, ctx, appDSN(p.addr("app")))
	if _, err := copyConn.Exec(ctx, "CREATE TABLE ops_drain (id bigint, payload text)"); err != nil {
		t.Fatalf("create table: %v", clientErr(t, err))
	}
	copyAddr := copyConn.PgConn().Conn().LocalAddr().String()
	sleepAddr := sleepConn.PgConn().Conn().LocalAddr().String()

	const total = 20 << 20
	rows := newOpsPacedRows(total, 8e6, 3<<20) // about 2.6s
	copyDone, sleepDone := make(chan error, 1), make(chan error, 1)
	var running sync.WaitGroup
	t.Cleanup(running.Wait) // before the connections' Close
	running.Add(2)
	go func() {
		defer running.Done()
		tag, err := copyConn.PgConn().CopyFrom(ctx, rows, "COPY ops_drain FROM STDIN")
		if err == nil && tag.RowsAffected() != rows.rows {
			err = fmt.Errorf("COPY FROM copied %d rows, sent %d", tag.RowsAffected(), rows.rows)
		}
		copyDone <- err
	}()
	go func() {
		defer running.Done()
		_, err := sleepConn.Exec(ctx, "SELECT pg_sleep(2)")
		sleepDone <- err
	}()
	select {
	case <-rows.reached:
	case err := <-copyDone:
		t.Fatalf("COPY ended before the signal: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("COPY did not get going")
	}

	sigAt := time.Now()
	p.signal(syscall.SIGTERM)
	// Readiness goes at once.
	var code int
	var body string
	for {
		code, body, _ = opsGet(p.adminURL() + "/readyz")
		if code == http.StatusServiceUnavailable || time.Since(sigAt) > 3*time.Second {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "draining") {
		t.Errorf("/readyz after SIGTERM = %d %q, want 503 saying draining", code, body)
	} else if took := time.Since(sigAt); took > time.Second {
		t.Errorf("/readyz turned 503 %v after SIGTERM; want at once", took)
	}
	// So does the listener.
	var dialErr error
	for time.Since(sigAt) < 3*time.Second {
		var c net.Conn
		if c, dialErr = net.DialTimeout("tcp", p.addr("app"), time.Second); dialErr != nil {
			break
		}
		c.Close()
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(dialErr, syscall.ECONNREFUSED) {
		t.Errorf("a new connection 1-3s after SIGTERM: %v; want connection refused", dialErr)
	}

	if err := <-sleepDone; err != nil {
		t.Errorf("pg_sleep(2) across SIGTERM: %v", clientErr(t, err))
	}
	if err := <-copyDone; err != nil {
		t.Errorf("20 MB COPY across SIGTERM: %v", clientErr(t, err))
	}
	finished := time.Since(sigAt)
	t.Logf("both statements finished %v after SIGTERM", finished.Round(time.Millisecond))
	if finished > 10*time.Second {
		t.Errorf("the statements finished %v after SIGTERM, past the 10s grace", finished)
	}
	if got := mustQueryString(t, ctx, sleepConn, "SELECT 'still in grace'"); got != "still in grace" {
		t.Errorf("a statement during the grace period: %q", got)
	}
	if p.hasExited() {
		t.Fatalf("credproxy exited (code %d) with sessions still open in the grace period", p.code)
	}
	copyConn.Close(ctx)
	sleepConn.Close(ctx)
	exitCode, ok := p.wait(9 * time.Second)
	if !ok {
		t.Fatalf("credproxy still running %v after SIGTERM and after its last session ended", time.Since(sigAt))
	}
	if exitCode != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", exitCode)
	}
	if took := p.exited.Sub(sigAt); took > 10*time.Second {
		t.Errorf("exited %v after SIGTERM, after the grace rather than when its sessions ended", took)
	}

	// The data arrived, and the audit log closed both sessions cleanly.
	admin, err := pgx.Connect(ctx, pg.DSN(pgtest.Superuser, pgtest.AppDB))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int64
	if err := admin.QueryRow(ctx, "SELECT count(*) FROM ops_drain").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != rows.rows {
		t.Errorf("ops_drain has %d rows, COPY sent %d", n, rows.rows)
	}
	for _, addr := range []string{copyAddr, sleepAddr} {
		var end *audit.Record
		for _, r := range p.auditRecords() {
			if r.Event == audit.EventSessionEnd && r.Client.Addr == addr {
				end = &r
			}
		}
		if end == nil || deref(end.Error) != "" {
			t.Errorf("session_end of %s = %+v; want one with an empty error", addr, end)
		}
		if addr == copyAddr && end != nil && (end.BytesIn == nil || *end.BytesIn < total) {
			t.Errorf("the COPY session's bytes_in = %v, want >= %d", ptrInt(end.BytesIn), total)
		}
	}
	if l := p.waitLog("shutting down", 1); l.Str("signal") != "terminated" {
		t.Errorf("shutting down line = %v", l)
	}
}

// TestOpsShutdownSecondSignal: with an idle session and a 30s grace, a
// second SIGTERM ends the drain at once, still with exit code 0.
func TestOpsShutdownSecondSignal(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "30s")
	p.start()
	ctx := testCtx(t, time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr("app")))
	mustQueryString(t, ctx, conn, "SELECT 'idle from now on'")

	p.signal(syscall.SIGTERM)
	p.waitLog("shutting down", 1)
	if _, ok := p.wait(time.Second); ok {
		t.Fatalf("credproxy exited (code %d) on the first SIGTERM with a session open and a 30s grace", p.code)
	}
	second := time.Now()
	p.signal(syscall.SIGTERM)
	code, ok := p.wait(2 * time.Second)
	if !ok {
		t.Fatalf("credproxy still running 2s after the second SIGTERM")
	}
	t.Logf("exited %v after the second SIGTERM", time.Since(second).Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit code %d after the second SIGTERM, want 0", code)
	}
	p.waitLog("second signal", 1)
	_, err := conn.Exec(ctx, "SELECT 1")
	if err == nil {
		t.Fatal("the session still works after credproxy exited")
	}
	clientErr(t, err)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code != "57P01" {
		t.Errorf("the idle session got %s %q, want 57P01 or a closed connection", pgErr.Code, pgErr.Message)
	}
}

// TestOpsShutdownSighupWhileDraining: a SIGHUP that arrives during the
// drain (a config reloader, a second deploy) is not the "second signal"
// that cuts the grace period short.
func TestOpsShutdownSighupWhileDraining(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "30s")
	p.start()
	ctx := testCtx(t, time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr("app")))
	mustQueryString(t, ctx, conn, "SELECT 'draining soon'")
	p.signal(syscall.SIGTERM)
	p.waitLog("shutting down", 1)
	p.signal(syscall.SIGHUP)
	if code, ok := p.wait(2 * time.Second); ok {
		t.Fatalf("credproxy exited (code %d) within 2s of a SIGHUP during a 30s drain: SIGHUP was taken for a second SIGTERM", code)
	}
	if got, err := queryString(t, ctx, conn, "SELECT 'still draining'"); err != nil || got != "still draining" {
		t.Errorf("the session after a SIGHUP during the drain: %q %v", got, err)
	}
	conn.Close(ctx)
	if code, ok := p.wait(5 * time.Second); !ok || code != 0 {
		t.Errorf("after the last session ended: exited %v, code %d; want exit 0", ok, code)
	}
}

// TestOpsShutdownRevokesLeases: with a Vault database secret and
// vault.revoke_on_shutdown, credproxy revokes its leases when it stops, so
// the dynamic roles vanish from the database.
func TestOpsShutdownRevokesLeases(t *testing.T) {
	opsBinaryTest(t)
	// Dynamic roles log in over TCP: every role gets scram-sha-256.
	pg := startPG(t, pgtest.Options{HBA: []string{"host all all 127.0.0.1/32 scram-sha-256"}})
	vs := vaulttest.Start(t, vaulttest.Options{})
	leaks.addSecret("the vault root token of "+t.Name(), vs.RootToken())
	vc := vs.Client(t)
	if err := vc.Sys().Mount("database", &vault.MountInput{Type: "database"}); err != nil {
		t.Fatal(err)
	}
	for path, data := range map[string]map[string]any{
		"database/config/pg": {
			"plugin_name":    "postgresql-database-plugin",
			"connection_url": fmt.Sprintf("postgresql://{{username}}:{{password}}@%s/%s?sslmode=disable", pg.Addr(), pgtest.AppDB),
			"username":       pgtest.Superuser,
			"password":       pg.Password(pgtest.Superuser),
			"allowed_roles":  "app",
		},
		"database/roles/app": {
			"db_name":             "pg",
			"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`},
			"default_ttl":         "1h",
			"max_ttl":             "24h",
		},
	} {
		if _, err := vc.Logical().Write(path, data); err != nil {
			t.Fatalf("write %s: %v", path, err)
		}
	}

	p := newOpsProc(t, func(p *opsProc) string {
		return opsHeader(p, "10s") + fmt.Sprintf(`vault:
  address: %s
  revoke_on_shutdown: true
  auth:
    method: token
    token_file: ./vault-token
secrets:
  app:
    vault:
      path: database/creds/app
postgres:
`, vs.URL()) + opsPGYAML("app", p.addr("app"), pg.Addr(), "app", "")
	})
	opsWriteSecret(t, p.path("vault-token"), vs.RootToken())
	p.start()
	leases := vs.Leases("database/creds/")
	if len(leases) != 1 {
		t.Fatalf("leases after start: %d, want 1 (fetched at start)", len(leases))
	}
	for _, id := range leases {
		leaks.addSecret("a lease id of "+t.Name(), id)
	}
	ctx := testCtx(t, time.Minute)
	conn := mustConnect(t, ctx, appDSN(p.addr("app")))
	role := mustQueryString(t, ctx, conn, "SELECT current_user")
	if !strings.HasPrefix(role, "v-") {
		t.Fatalf("current_user = %q, want a dynamic v-… role", role)
	}
	p.signal(syscall.SIGTERM)
	p.waitLog("shutting down", 1)
	conn.Close(ctx)
	code, ok := p.wait(15 * time.Second)
	if !ok || code != 0 {
		t.Fatalf("after SIGTERM and the last session's end: exited %v, code %d; want exit 0", ok, code)
	}
	if left := vs.Leases("database/creds/"); len(left) != 0 {
		t.Errorf("leases left after credproxy stopped with revoke_on_shutdown: %d", len(left))
	}
	admin, err := pgx.Connect(ctx, pg.DSN(pgtest.Superuser, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int
	if err := admin.QueryRow(ctx, "SELECT count(*) FROM pg_roles WHERE rolname = $1", role).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("the dynamic role %s still exists after its lease was revoked", role)
	}
}

// TestOpsLogging: every operational line about a session carries its
// session_id, and --log-level selects what is written.
func TestOpsLogging(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	gone := closedPort(t)
	newProc := func(t *testing.T) *opsProc {
		p := newOpsProc(t, func(p *opsProc) string {
			return opsHeader(p, "5s") + fmt.Sprintf("secrets:\n  app:\n    static:\n      username: %s\n      password_file: ./app.pw\npostgres:\n", pgtest.ScramUser) +
				opsPGYAML("app", p.addr("app"), pg.Addr(), "app", "") +
				opsPGYAML("gone", p.addr("gone"), gone, "app", "")
		})
		opsWriteSecret(t, p.path("app.pw"), pg.Password(pgtest.ScramUser))
		return p
	}
	// sessions runs one good session, one denied and one that closes
	// before its startup packet, then stops credproxy.
	sessions := func(t *testing.T, p *opsProc) {
		ctx := testCtx(t, 30*time.Second)
		conn := mustConnect(t, ctx, appDSN(p.addr("app")))
		mustQueryString(t, ctx, conn, "SELECT 'logged'")
		conn.Close(ctx)
		if _, err := connect(t, ctx, appDSN(p.addr("gone"))); err == nil {
			t.Fatal("connected to a closed upstream")
		}
		raw, err := net.Dial("tcp", p.addr("app"))
		if err != nil {
			t.Fatal(err)
		}
		raw.Close()
		opsWaitFor(t, 10*time.Second, "the audit records of both sessions", func() error {
			var ends, denied int
			for _, r := range p.auditRecords() {
				switch {
				case r.Event == audit.EventSessionEnd && r.Service == "app":
					ends++
				case r.Event == audit.EventDenied:
					denied++
				}
			}
			if ends < 1 || denied < 1 {
				return fmt.Errorf("%d session_end, %d denied", ends, denied)
			}
			return nil
		})
		time.Sleep(200 * time.Millisecond) // the raw connection's line
		p.signal(syscall.SIGTERM)
		if code, ok := p.wait(10 * time.Second); !ok || code != 0 {
			t.Fatalf("after SIGTERM: exited %v, code %d; want exit 0", ok, code)
		}
	}

	t.Run("Debug", func(t *testing.T) {
		t.Parallel()
		p := newProc(t)
		p.start("--log-level", "debug")
		sessions(t, p)
		lines := p.logLines()
		seen := map[string][]string{} // msg -> session ids
		var debug int
		for _, l := range lines {
			if l.Level() == "debug" {
				debug++
			}
			_, hasClient := l["client"]
			switch msg := l.Msg(); {
			case msg == "session started" || msg == "session ended" || msg == "session denied" || hasClient:
				id := l.Str("session_id")
				if !regexp.MustCompile(`^[0-9a-f]{16,}$`).MatchString(id) {
					t.Errorf("session line without a session_id: %v", l)
				}
				seen[msg] = append(seen[msg], id)
			}
		}
		for _, msg := range []string{"session started", "session ended", "session denied"} {
			if len(seen[msg]) == 0 {
				t.Errorf("no %q line on stderr", msg)
			}
		}
		if len(seen["session started"]) == 1 && !slices.Contains(seen["session ended"], seen["session started"][0]) {
			t.Errorf("session started %v and session ended %v lines do not share a session_id", seen["session started"], seen["session ended"])
		}
		if debug == 0 {
			t.Errorf("no debug line with --log-level debug (a connection closed before its startup packet logs one)")
		}
	})

	t.Run("Warn", func(t *testing.T) {
		t.Parallel()
		p := newProc(t)
		p.start("--log-level", "warn")
		sessions(t, p)
		var warn int
		for _, l := range p.logLines() {
			switch l.Level() {
			case "debug", "info":
				t.Errorf("a %s line with --log-level warn: %v", l.Level(), l)
			case "warn":
				warn++
				if l.Msg() == "session denied" && l.Str("session_id") == "" {
					t.Errorf("session denied line without session_id: %v", l)
				}
			}
		}
		if warn == 0 {
			t.Errorf("no warn line (a denied session logs one)")
		}
	})

	t.Run("Bogus", func(t *testing.T) {
		t.Parallel()
		p := newProc(t)
		p.writeConfig()
		code, _, stderr := opsRunCLI(t, "run", "--config", p.cfgPath, "--log-level", "bogus")
		if code != 2 || !strings.Contains(stderr, "--log-level") {
			t.Errorf("run --log-level bogus: exit %d, stderr %q; want exit 2 naming --log-level", code, stderr)
		}
	})
}

// TestOpsCLI checks the exit codes: 0 clean, 1 bad config, 2 usage.
func TestOpsCLI(t *testing.T) {
	opsBinaryTest(t)
	dir := t.TempDir()
	// Not given to the no-leak collector: no command here reads it (validate
	// only checks that the file is readable), and a registered secret makes
	// the suite demand session logs, which this test has none of.
	opsWriteSecret(t, dir+"/app.pw", "ops-cli-password-3f9a")
	good := dir + "/good.yaml"
	if err := os.WriteFile(good, []byte(`secrets:
  app:
    static:
      username: app
      password_file: ./app.pw
postgres:
  - name: app
    listen: 127.0.0.1:0
    upstream: 127.0.0.1:5432
    credentials: app
    tls: {mode: disable}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := dir + "/bad.yaml"
	if err := os.WriteFile(bad, []byte(`shutdown_grace: soon
bogus_key: 1
admin:
  listen: "127.0.0.1:notaport"
secrets:
  app:
    static:
      username: app
      password_file: ./missing.pw
postgres:
  - name: "bad name!"
    listen: 127.0.0.1:0
    upstream: 127.0.0.1:5432
    credentials: nope
    tls:
      mode: sometimes
`), 0o600); err != nil {
		t.Fatal(err)
	}

	run := func(name string, f func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f(t)
		})
	}
	run("version", func(t *testing.T) {
		code, stdout, _ := opsRunCLI(t, "version")
		if code != 0 || !strings.HasPrefix(stdout, "credproxy ") {
			t.Errorf("version: exit %d, stdout %q; want 0 and \"credproxy …\"", code, stdout)
		}
	})
	run("unknown-command", func(t *testing.T) {
		code, _, stderr := opsRunCLI(t, "frobnicate")
		if code != 2 || !strings.Contains(stderr, "frobnicate") {
			t.Errorf("frobnicate: exit %d, stderr %q; want 2 naming the command", code, stderr)
		}
	})
	run("unknown-flag", func(t *testing.T) {
		if code, _, stderr := opsRunCLI(t, "run", "--config", good, "--no-such-flag"); code != 2 {
			t.Errorf("run --no-such-flag: exit %d, stderr %q; want 2", code, stderr)
		}
	})
	run("validate-good", func(t *testing.T) {
		if code, stdout, stderr := opsRunCLI(t, "validate", "--config", good); code != 0 {
			t.Errorf("validate good config: exit %d, %q %q; want 0", code, stdout, stderr)
		}
	})
	run("validate-bad", func(t *testing.T) {
		code, _, stderr := opsRunCLI(t, "validate", "--config", bad)
		if code != 1 {
			t.Errorf("validate bad config: exit %d, want 1", code)
		}
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		t.Logf("validate printed:\n%s", stderr)
		pathRE := regexp.MustCompile(`^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: \S`)
		for _, l := range lines {
			if !pathRE.MatchString(l) {
				t.Errorf("problem line without a key path: %q", l)
			}
		}
		for _, path := range []string{"shutdown_grace:", "bogus_key", "admin.listen:", "secrets.app.static.password_file:",
			"postgres[0].name:", "postgres[0].credentials:", "postgres[0].tls.mode:"} {
			found := false
			for _, l := range lines {
				if strings.Contains(l, path) {
					found = true
				}
			}
			if !found {
				t.Errorf("no problem line for %s", path)
			}
		}
	})
	run("validate-missing-file", func(t *testing.T) {
		if code, _, stderr := opsRunCLI(t, "validate", "--config", dir+"/nope.yaml"); code != 1 {
			t.Errorf("validate a missing file: exit %d, stderr %q; want 1", code, stderr)
		}
	})
	run("run-bad-config", func(t *testing.T) {
		code, _, stderr := opsRunCLI(t, "run", "--config", bad)
		if code != 1 || !strings.Contains(stderr, "postgres[0].tls.mode") {
			t.Errorf("run with a bad config: exit %d, stderr %q; want 1 and the problems", code, stderr)
		}
	})
}

// opsRandomToken is 16 random hex characters.
func opsRandomToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
