package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credproxy/credproxy/integration/pgtest"
)

// fdCount is what a process holds: all descriptors, and how many are
// sockets and pipes.
type fdCount struct{ all, sockets, pipes int }

func countFDs(t *testing.T, pid int) fdCount {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("list descriptors: %v", err)
	}
	var c fdCount
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		c.all++
		switch {
		case strings.HasPrefix(target, "socket:"):
			c.sockets++
		case strings.HasPrefix(target, "pipe:"):
			c.pipes++
		}
	}
	return c
}

// openSessions connects n plain-TCP sessions through addr, each with a
// query answered; it returns them and the errors of those refused.
func openSessions(t *testing.T, ctx context.Context, addr string, n int) (conns []*pgconn.PgConn, refused []error) {
	t.Helper()
	for range n {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second) // a connection left unanswered fails fast
		conn, err := pgconn.Connect(cctx, appDSN(addr))
		cancel()
		if err != nil {
			refused = append(refused, clientErr(t, err))
			continue
		}
		if _, err := conn.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
			t.Fatalf("query: %v", err)
		}
		conns = append(conns, conn)
	}
	t.Cleanup(func() { closeSessions(conns) })
	return conns, refused
}

func closeSessions(conns []*pgconn.PgConn) {
	for _, c := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = c.Close(ctx)
		cancel()
	}
}

// waitFDs waits up to 15s for the process to hold at most want
// descriptors, and returns what it holds.
func waitFDs(t *testing.T, pid int, want int) fdCount {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c := countFDs(t, pid)
		if c.all <= want || time.Now().After(deadline) {
			return c
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDescriptorsPerSession measures what a plain-TCP Postgres session
// costs the credproxy process: two sockets (the app's and the upstream's)
// and nothing else — no splice pipes — and that all of it is given back
// when the sessions end.
func TestDescriptorsPerSession(t *testing.T) {
	opsBinaryTest(t)
	pg := startPG(t, pgtest.Options{})
	p := opsStaticProc(t, pg, pgtest.ScramUser, "5s")
	p.start()
	pid := p.cmd.Process.Pid
	ctx := testCtx(t, 2*time.Minute)

	// One session first: whatever is opened once (the audit log, the
	// runtime's) is then in the baseline.
	warm, _ := openSessions(t, ctx, p.addr("app"), 1)
	closeSessions(warm)
	time.Sleep(200 * time.Millisecond) // the warm-up session's descriptors are closed
	base := countFDs(t, pid)

	const n = 50
	conns, refused := openSessions(t, ctx, p.addr("app"), n)
	if len(refused) > 0 {
		t.Fatalf("%d sessions refused: %v", len(refused), refused[0])
	}
	during := countFDs(t, pid)
	perSession := float64(during.all-base.all) / n
	t.Logf("descriptors: %d before, %d with %d sessions (%.2f per session; sockets %d -> %d, pipes %d -> %d)",
		base.all, during.all, n, perSession, base.sockets, during.sockets, base.pipes, during.pipes)
	if during.all-base.all != 2*n || during.pipes != base.pipes {
		t.Errorf("%d sessions hold %d descriptors (%d pipes more); want 2 sockets each and no pipes", n, during.all-base.all, during.pipes-base.pipes)
	}

	closeSessions(conns)
	after := waitFDs(t, pid, base.all)
	t.Logf("descriptors after the sessions ended: %d (pipes %d)", after.all, after.pipes)
	if after.all > base.all || after.pipes > base.pipes {
		t.Errorf("%d descriptors (%d pipes) 15s after the sessions ended; want the %d (%d) from before", after.all, after.pipes, base.all, base.pipes)
	}
}

// TestDescriptorLimit runs credproxy under a low open-file limit (prlimit
// on the binary, soft and hard, so the runtime cannot raise it) and opens
// more sessions than fit: the ones over the budget get a clean FATAL 53300,
// counted in credproxy_connections_refused_total, while /healthz, /readyz
// and /metrics keep answering; once sessions end, new ones are served.
//
// With max_sessions and max_handshakes set far above what the limit
// allows, the process-wide budget still refuses in time.
func TestDescriptorLimit(t *testing.T) {
	opsBinaryTest(t)
	if _, err := os.Stat("/usr/bin/prlimit"); err != nil {
		t.Skip("prlimit (util-linux) is needed")
	}
	for _, tc := range []struct{ name, limits string }{
		{"derived limits", ""},
		{"limits over the budget", "    max_sessions: 1000\n    max_handshakes: 500\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testDescriptorLimit(t, tc.limits)
		})
	}
}

func testDescriptorLimit(t *testing.T, limits string) {
	pg := startPG(t, pgtest.Options{})
	p := newOpsProc(t, func(p *opsProc) string {
		return opsHeader(p, "5s") + fmt.Sprintf("secrets:\n  app:\n    static:\n      username: %s\n      password_file: ./app.pw\npostgres:\n", pgtest.ScramUser) +
			opsPGYAML("app", p.addr("app"), pg.Addr(), "app", "") + limits
	})
	opsWriteSecret(t, p.path("app.pw"), pg.Password(pgtest.ScramUser))
	const nofile = 256
	p.wrap = []string{"/usr/bin/prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}
	p.start()
	ctx := testCtx(t, 3*time.Minute)

	// Under 256 descriptors the default max_sessions is 42 and the
	// process-wide budget 48 connections (README: Limits); the rest must be
	// refused, cleanly.
	const n = 150
	conns, refused := openSessions(t, ctx, p.addr("app"), n)
	t.Logf("under RLIMIT_NOFILE %d: %d sessions served, %d refused; credproxy holds %d descriptors",
		nofile, len(conns), len(refused), countFDs(t, p.cmd.Process.Pid).all)
	if len(refused) == 0 {
		t.Fatalf("all %d sessions served under a limit of %d descriptors", n, nofile)
	}
	for _, err := range refused {
		if pgErr := pgError(t, err); pgErr.Code != "53300" || pgErr.Severity != "FATAL" {
			t.Fatalf("refusal %s %s %q; want FATAL 53300", pgErr.Severity, pgErr.Code, pgErr.Message)
		}
	}
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		code, _, err := opsGet(p.adminURL() + path)
		if err != nil || code != http.StatusOK {
			t.Errorf("GET %s with the sessions full: %d %v", path, code, err)
		}
	}
	if v, _ := p.metrics().value("credproxy_connections_refused_total", map[string]string{"service": "app"}); v != float64(len(refused)) {
		t.Errorf("connections_refused_total = %v, want %d", v, len(refused))
	}
	if strings.Contains(string(p.stderr.Bytes()), "too many open files") {
		t.Errorf("credproxy ran out of descriptors:\n%s", tail(p.stderr.Bytes(), 20))
	}

	// Once the sessions have ended (credproxy sees each close a moment
	// after the app), new ones are served again.
	closeSessions(conns)
	deadline := time.Now().Add(15 * time.Second)
	for {
		again, refusedAgain := openSessions(t, ctx, p.addr("app"), 1)
		if len(again) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("15s after the sessions ended a new one is still refused: %v", refusedAgain)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
