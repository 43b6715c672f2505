package proxy

import (
	"bufio"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/credproxy/credproxy/proxy/credentials"
)

// Every metric the dashboard and alert rules use (deploy/monitoring/
// metrics.txt, which a deploy test checks them against) must be exported.
func TestMonitoringMetricsExist(t *testing.T) {
	m := NewMetrics()
	m.registerReady(func() bool { return true })
	// Vectors appear in Gather once a series exists: touch each one.
	po := postgresObserver{m}
	po.SessionStarted("db")
	po.SessionEnded("db", "ok", time.Second, 1, 1)
	po.Denied("db", "upstream_auth")
	po.UpstreamConnected("db", time.Millisecond)
	co := credentialObserver{m}
	co.Fetched("c", time.Millisecond, errors.New("vault unreachable"))
	co.Renewed("c", nil)
	co.Rotated("c", nil)
	co.LeasesActive("c", 1)
	httpObserver{m}.Request("api.example.com", 200, true)
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
	n := 0
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		n++
		if !have[name] {
			t.Errorf("deploy/monitoring uses %s, which credproxy does not export", name)
		}
	}
	if n < 14 {
		t.Errorf("metrics.txt lists %d metrics; expected at least the 14 credproxy_* ones", n)
	}
}

// Fetch failures are labelled by their kind, whatever their text says.
func TestCredentialErrorLabelsByKind(t *testing.T) {
	m := NewMetrics()
	co := credentialObserver{m}
	co.Fetched("c", time.Millisecond, &credentials.Error{Kind: credentials.KindTimeout, Msg: "unreachable: 403 not found"})
	co.Fetched("c", time.Millisecond, errors.New("vault unreachable: 403 permission denied"))
	for _, tc := range []struct {
		kind string
		want float64
	}{{"timeout", 1}, {"other", 1}, {"unreachable", 0}, {"permission_denied", 0}} {
		if got := testutil.ToFloat64(m.credentialErrors.WithLabelValues("c", tc.kind)); got != tc.want {
			t.Errorf("credential_fetch_errors_total{kind=%q} = %v, want %v", tc.kind, got, tc.want)
		}
	}
}
