package postgres

import (
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/limit"
)

func withLimits(l *limit.Listener) proxyOption {
	return func(o *Options) { o.Limits = l }
}

var limitParams = map[string]string{"user": "app", "database": "app"}

// checkTooMany fails unless e is PostgreSQL's refusal over a limit, with
// credproxy's prefix and the key that was reached.
func checkTooMany(t *testing.T, e *pgproto3.ErrorResponse, key string) {
	t.Helper()
	if e == nil {
		t.Fatal("no ErrorResponse")
	}
	want := "credproxy: sorry, too many clients already: " + key
	if e.Severity != "FATAL" || e.Code != codeTooManyConnections || !strings.HasPrefix(e.Message, want) {
		t.Errorf("got %s %s %q, want FATAL 53300 %q…", e.Severity, e.Code, e.Message, want)
	}
}

// max_sessions: a session over the limit is refused after its startup
// packet with FATAL 53300, as PostgreSQL refuses one over max_connections;
// a cancel request still gets through, and a place freed is taken again.
func TestMaxSessions(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	svc := testService(up.addr)
	svc.MaxSessions, svc.MaxHandshakes = 2, 8
	m := proxy.NewMetrics()
	p := startProxy(t, svc, withMetrics(m))

	c1 := dialProxy(t, p.addr)
	h1 := c1.connect(limitParams)
	c2 := dialProxy(t, p.addr)
	c2.connect(limitParams)

	c3 := dialProxy(t, p.addr)
	c3.write(encodeStartup(protocol30, limitParams))
	checkTooMany(t, c3.readError(), "max_sessions 2")
	if err := p.wait(t); err == nil {
		t.Error("the refused session returned no error")
	}
	if n := up.connCount(); n != 2 {
		t.Errorf("upstream saw %d connections, want 2: the refused session must not reach it", n)
	}
	rec := p.audit.find(audit.EventDenied)
	if len(rec) != 1 || rec[0].Reason != "too many clients" || rec[0].SQLState != codeTooManyConnections {
		t.Errorf("denied records: %+v", rec)
	}

	// A cancel request is not a session: it gets through at the limit.
	cc := dialProxy(t, p.addr)
	cc.write(cancelPacket(h1.key.ProcessID, h1.key.SecretKey))
	cc.expectClosed()
	select {
	case <-up.cancelCh:
	case <-time.After(ioTimeout):
		t.Fatal("the cancel request was not forwarded at max_sessions")
	}
	_ = p.wait(t)

	c1.send(&pgproto3.Terminate{})
	c1.expectClosed()
	_ = p.wait(t)
	c4 := dialProxy(t, p.addr)
	c4.connect(limitParams)

	// Counted as refused, and as denied, but not as an auth failure.
	refused := map[string]string{"protocol": "postgres", "service": "appdb", "reason": RefusedMaxSessions}
	if v := metricValue(t, m, "credproxy_connections_refused_total", refused); v != 1 {
		t.Errorf("credproxy_connections_refused_total%v = %v, want 1", refused, v)
	}
	denied := map[string]string{"protocol": "postgres", "service": "appdb", "result": "denied"}
	if v := metricValue(t, m, "credproxy_sessions_total", denied); v != 1 {
		t.Errorf("credproxy_sessions_total%v = %v, want 1", denied, v)
	}
	countSeries(t, m, map[string]int{"credproxy_connections_refused_total": 1, "credproxy_auth_failures_total": 0})
}

// countSeries checks how many series each metric has.
func countSeries(t *testing.T, m *proxy.Metrics, want map[string]int) {
	t.Helper()
	for name, n := range want {
		got, err := testutil.GatherAndCount(m.Registry, name)
		if err != nil {
			t.Fatal(err)
		}
		if got != n {
			t.Errorf("%s has %d series, want %d", name, got, n)
		}
	}
}

// waitInUse waits until c has n places taken (the test's accept loop
// serves each connection on a goroutine of its own).
func waitInUse(t *testing.T, c *limit.Counter, n int) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for c.InUse() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d places taken, want %d", c.InUse(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// max_handshakes: a connection over the limit is refused at once, before
// anything is read — whether it sends nothing or has sent its startup
// packet already — and the client reads the FATAL, not a reset. A session
// that completes its handshake gives its place back.
func TestMaxHandshakes(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	svc := testService(up.addr)
	svc.MaxSessions, svc.MaxHandshakes = 100, 2
	m := proxy.NewMetrics()
	lim := &limit.Listener{}
	p := startProxy(t, svc, withMetrics(m), withLimits(lim))

	// Two connections that never send their startup packet hold both places.
	slow1 := dialProxy(t, p.addr)
	slow2 := dialProxy(t, p.addr)
	waitInUse(t, &lim.Handshakes, 2)

	silent := dialProxy(t, p.addr) // sends nothing
	checkTooMany(t, silent.readError(), "max_handshakes 2")
	eager := dialProxy(t, p.addr) // its startup packet is waiting, unread
	eager.write(encodeStartup(protocol30, limitParams))
	checkTooMany(t, eager.readError(), "max_handshakes 2")
	for range 2 {
		if err := p.wait(t); err == nil {
			t.Error("a refused connection returned no error")
		}
	}

	// One slow client finishes its handshake: the session goes on, and
	// its handshake place is free for the next connection.
	slow1.connect(limitParams)
	waitInUse(t, &lim.Handshakes, 1)
	next := dialProxy(t, p.addr)
	next.connect(limitParams)
	if got := lim.Sessions.InUse(); got != 2 {
		t.Errorf("%d sessions counted, want 2", got)
	}
	slow2.conn.Close()
	_ = p.wait(t)
	waitInUse(t, &lim.Handshakes, 0)

	refused := map[string]string{"protocol": "postgres", "service": "appdb", "reason": RefusedMaxHandshakes}
	if v := metricValue(t, m, "credproxy_connections_refused_total", refused); v != 2 {
		t.Errorf("credproxy_connections_refused_total%v = %v, want 2", refused, v)
	}
	countSeries(t, m, map[string]int{"credproxy_connections_refused_total": 1})
	if n := up.connCount(); n != 2 {
		t.Errorf("upstream saw %d connections, want 2", n)
	}
}

// The counters are the engine's, shared by the handlers a reload swaps in:
// a new handler counts the sessions its predecessor still serves.
func TestLimitsCarryAcrossHandlers(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	svc := testService(up.addr)
	svc.MaxSessions, svc.MaxHandshakes = 1, 4
	lim := &limit.Listener{}
	old := startProxy(t, svc, withLimits(lim))
	c := dialProxy(t, old.addr)
	c.connect(limitParams)

	next := startProxy(t, svc, withLimits(lim))
	c2 := dialProxy(t, next.addr)
	c2.write(encodeStartup(protocol30, limitParams))
	checkTooMany(t, c2.readError(), "max_sessions 1")
	_ = next.wait(t)
}
