package proxy

import (
	"bufio"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/credproxy/credproxy/proxy/credentials"
)

// Every metric the dashboard and alert rules use (deploy/monitoring/
// metrics.txt, which a deploy test checks them against) must be exported.
func TestMonitoringMetricsExist(t *testing.T) {
	m := NewMetrics()
	m.registerReady(func() bool { return true })
	// Vectors appear in Gather once a series exists: touch each one.
	m.SessionStarted("postgres", "db")
	m.SessionEnded("postgres", "db", "ok", time.Second, 1, 1)
	m.Denied("postgres", "db", "upstream_auth", true)
	m.UpstreamConnected("postgres", "db", time.Millisecond)
	m.Fetched("c", time.Millisecond, errors.New("vault unreachable"))
	m.Renewed("c", nil)
	m.Rotated("c", nil)
	m.LeasesActive("c", 1)
	m.HTTPRequest("api.example.com", 200, true)
	m.configReloads.WithLabelValues("ok").Inc()

	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range families {
		have[f.GetName()] = true
	}

	f, err := os.Open("../deploy/monitoring/metrics.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	listed := map[string]bool{}
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		listed[name] = true
		if !have[name] && !slices.Contains(m.Names(), name) {
			t.Errorf("deploy/monitoring uses %s, which credproxy does not export", name)
		}
	}
	// And the other way: every metric credproxy has is in metrics.txt, so
	// the deploy tests make the dashboard show it.
	for _, name := range m.Names() {
		if !listed[name] {
			t.Errorf("credproxy exports %s, which deploy/monitoring/metrics.txt does not list (add it, and a dashboard panel)", name)
		}
	}
	if len(m.Names()) < 19 {
		t.Errorf("Names lists %d metrics, want every credproxy_* one: %v", len(m.Names()), m.Names())
	}
}

// Fetch failures are labelled by their kind, whatever their text says.
func TestCredentialErrorLabelsByKind(t *testing.T) {
	m := NewMetrics()
	m.Fetched("c", time.Millisecond, &credentials.Error{Kind: credentials.KindTimeout, Msg: "unreachable: 403 not found"})
	m.Fetched("c", time.Millisecond, errors.New("vault unreachable: 403 permission denied"))
	for _, tc := range []struct {
		kind string
		want float64
	}{{"timeout", 1}, {"other", 1}, {"unreachable", 0}, {"permission_denied", 0}} {
		if got := testutil.ToFloat64(m.credentialErrors.WithLabelValues("c", tc.kind)); got != tc.want {
			t.Errorf("credential_fetch_errors_total{kind=%q} = %v, want %v", tc.kind, got, tc.want)
		}
	}
}

// Protocols and the store count without a nil check: a nil *Metrics
// counts nothing.
func TestNilMetricsCountNothing(t *testing.T) {
	var m *Metrics
	m.SessionStarted("postgres", "db")
	m.SessionEnded("postgres", "db", "ok", time.Second, 1, 1)
	m.Denied("postgres", "db", "upstream_auth", true)
	m.UpstreamConnected("postgres", "db", time.Millisecond)
	m.Refused("http", "http", "max_connections")
	m.TimedOut("http", "api.example.com", "body_read")
	m.Migrated("db", "ok", time.Millisecond)
	m.HTTPRequest("none", 403, false)
	m.Fetched("c", time.Millisecond, errors.New("x"))
	m.Renewed("c", nil)
	m.Rotated("c", nil)
	m.LeasesActive("c", 1)
}

// A denial is a session in sessions_total; an auth failure only when the
// protocol says so. A migration's swap time is recorded for "ok" only.
func TestDeniedAndMigrated(t *testing.T) {
	m := NewMetrics()
	m.Denied("postgres", "db", "upstream_auth", true)
	m.Denied("postgres", "db", "bad_startup", false)
	m.Migrated("db", "ok", time.Millisecond)
	m.Migrated("db", "failed", 0)
	for _, tc := range []struct {
		name string
		c    prometheus.Collector
		want float64
	}{
		{"sessions_total denied", m.sessionsTotal.WithLabelValues("postgres", "db", "denied"), 2},
		{"auth_failures_total upstream_auth", m.authFailures.WithLabelValues("postgres", "db", "upstream_auth"), 1},
		{"migrations_total ok", m.migrations.WithLabelValues("db", "ok"), 1},
		{"migrations_total failed", m.migrations.WithLabelValues("db", "failed"), 1},
	} {
		if got := testutil.ToFloat64(tc.c); got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, got, tc.want)
		}
	}
	if n := testutil.CollectAndCount(m.authFailures); n != 1 {
		t.Errorf("auth_failures_total has %d series, want 1", n)
	}
	if n := testutil.CollectAndCount(m.migrationSwap); n != 1 {
		t.Errorf("migration_swap_seconds has %d series, want 1 (ok only)", n)
	}
}
