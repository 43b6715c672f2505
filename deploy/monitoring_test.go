package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
)

const (
	rulesFile     = "monitoring/prometheus-rules.yaml"
	dashboardFile = "monitoring/grafana-dashboard.json"
	metricsFile   = "monitoring/metrics.txt"
)

var promqlParser = parser.NewParser(parser.Options{})

// seriesNames returns the metric names an expression selects.
func seriesNames(expr string) ([]string, error) {
	e, err := promqlParser.ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == model.MetricNameLabel && m.Type == labels.MatchEqual {
				name = m.Value
			}
		}
		if name != "" {
			names = append(names, name)
		}
		return nil
	})
	return names, nil
}

// family maps a series name to the metric family metrics.txt lists: a
// histogram's _bucket, _sum and _count series belong to the histogram.
func family(name string, listed map[string]bool) string {
	if listed[name] {
		return name
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && listed[base] {
			return base
		}
	}
	return name
}

func readMetricsList(t *testing.T) (map[string]bool, []string) {
	t.Helper()
	data, err := os.ReadFile(metricsFile)
	if err != nil {
		t.Fatal(err)
	}
	valid := regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	listed := map[string]bool{}
	var order []string
	for i, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if !valid.MatchString(line) {
			t.Errorf("%s:%d: %q is not a metric name", metricsFile, i+1, line)
		}
		if listed[line] {
			t.Errorf("%s:%d: %s listed twice", metricsFile, i+1, line)
		}
		listed[line] = true
		order = append(order, line)
	}
	if !slices.IsSorted(order) {
		t.Errorf("%s is not sorted", metricsFile)
	}
	return listed, order
}

func loadRules(t *testing.T) *rulefmt.RuleGroups {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	groups, errs := rulefmt.ParseFile(rulesFile, false, model.LegacyValidation, promqlParser, logger)
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil || len(errs) > 0 {
		t.FailNow()
	}
	return groups
}

// grafanaPanel is the part of a Grafana panel the tests read.
type grafanaPanel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaDashboard struct {
	UID           string         `json:"uid"`
	Title         string         `json:"title"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

func loadDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// grafanaVars are Grafana's interval variables; PromQL needs a duration there.
var grafanaVars = regexp.MustCompile(`\$\{?__(rate_interval|interval|range)\}?`)

// labelValues is a template variable query: label_values(selector, label).
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*[a-zA-Z_][a-zA-Z0-9_]*\)$`)

// dashboardExprs returns every PromQL expression in the dashboard: panel
// targets and template variable queries, keyed by where they are.
func dashboardExprs(t *testing.T, d grafanaDashboard) map[string]string {
	t.Helper()
	exprs := map[string]string{}
	var walk func(ps []grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				exprs[fmt.Sprintf("panel %q target %s", p.Title, tg.RefID)] = grafanaVars.ReplaceAllString(tg.Expr, "5m")
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(map[string]any)
		s, _ := q["query"].(string)
		m := labelValues.FindStringSubmatch(s)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, s)
			continue
		}
		exprs["variable "+v.Name] = m[1]
	}
	return exprs
}

// TestMetricsList: every metric the rules and the dashboard use is in
// metrics.txt (which a test of the code checks against the registry), every
// one listed is used, and the dashboard shows every credproxy metric.
func TestMetricsList(t *testing.T) {
	listed, order := readMetricsList(t)
	used := map[string][]string{} // family -> where
	use := func(where, expr string) {
		names, err := seriesNames(expr)
		if err != nil {
			t.Errorf("%s: %q: %v", where, expr, err)
			return
		}
		if len(names) == 0 {
			t.Errorf("%s: %q selects no metric", where, expr)
		}
		for _, n := range names {
			f := family(n, listed)
			if !listed[f] {
				t.Errorf("%s uses %s, which %s does not list", where, n, metricsFile)
			}
			used[f] = append(used[f], where)
		}
	}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			use("rule "+r.Alert+r.Record, r.Expr)
		}
	}
	inDashboard := map[string]bool{}
	for where, expr := range dashboardExprs(t, loadDashboard(t)) {
		use("dashboard "+where, expr)
		names, _ := seriesNames(expr)
		for _, n := range names {
			inDashboard[family(n, listed)] = true
		}
	}
	for _, m := range order {
		if len(used[m]) == 0 {
			t.Errorf("%s lists %s, which neither the rules nor the dashboard use", metricsFile, m)
		}
	}
	// metrics.txt lists every metric credproxy exports (a proxy test checks
	// it against the code): the dashboard shows each credproxy_* one.
	for _, m := range order {
		if !strings.HasPrefix(m, "credproxy_") {
			continue
		}
		if !inDashboard[m] {
			t.Errorf("the dashboard shows no panel for %s", m)
		}
	}
}

// TestGrafanaDashboard checks the dashboard's structure: unique panel ids,
// every panel on the ${datasource} variable, a layout with no overlaps.
func TestGrafanaDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" || d.SchemaVersion < 36 {
		t.Errorf("uid %q, title %q, schemaVersion %d: want a uid, a title and schema 36+", d.UID, d.Title, d.SchemaVersion)
	}
	if !slices.ContainsFunc(d.Templating.List, func(v struct {
		Name  string `json:"name"`
		Type  string `json:"type"`
		Query any    `json:"query"`
	}) bool {
		return v.Name == "datasource" && v.Type == "datasource"
	}) {
		t.Error("no datasource template variable: the dashboard would be tied to one Prometheus")
	}
	ids := map[int]string{}
	type cell struct{ x, y int }
	taken := map[cell]string{}
	for _, p := range d.Panels {
		if prev, dup := ids[p.ID]; dup || p.ID == 0 {
			t.Errorf("panel %q: id %d (also %q)", p.Title, p.ID, prev)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W < 1 || g.H < 1 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v is outside the 24-column grid", p.Title, g)
		}
		for x := g.X; x < g.X+g.W; x++ {
			for y := g.Y; y < g.Y+g.H; y++ {
				if prev, ok := taken[cell{x, y}]; ok {
					t.Errorf("panel %q overlaps panel %q at %d,%d", p.Title, prev, x, y)
				}
				taken[cell{x, y}] = p.Title
			}
		}
		if p.Type == "row" {
			continue
		}
		if p.Type != "timeseries" && p.Type != "stat" {
			t.Errorf("panel %q: unexpected type %q", p.Title, p.Type)
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource is not ${datasource}", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
	}
}

// TestPrometheusRules: the rules file parses as Prometheus parses it, and
// every alert is actionable: a severity, a summary, a description.
func TestPrometheusRules(t *testing.T) {
	seen := map[string]bool{}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("group %s: recording rule %s: this file holds alerts only", g.Name, r.Record)
				continue
			}
			if seen[r.Alert] {
				t.Errorf("alert %s defined twice", r.Alert)
			}
			seen[r.Alert] = true
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("alert %s: severity %q, want critical or warning", r.Alert, s)
			}
			for _, a := range []string{"summary", "description"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("alert %s has no %s", r.Alert, a)
				}
			}
		}
	}
	if len(seen) == 0 {
		t.Fatal("no alerts")
	}
}

// alertScenarios give each alert a failure it must fire on and a healthy
// credproxy it must stay quiet on. Series are in promqltest's load syntax,
// one sample a minute for 40 minutes.
var alertScenarios = map[string]struct{ firing, quiet string }{
	"CredproxyNotReady": {
		firing: `credproxy_ready{job="cp", instance="i", namespace="n", pod="p"} 0x40`,
		quiet:  `credproxy_ready{job="cp", instance="i", namespace="n", pod="p"} 1x40`,
	},
	"CredproxyAbsent": {
		firing: `go_goroutines{job="other", instance="i"} 10x40`,
		quiet:  `credproxy_ready{job="cp", instance="i", namespace="n", pod="p"} 1x40`,
	},
	"CredproxyRestarting": {
		firing: `process_start_time_seconds{job="cp", instance="i", namespace="n", pod="p"} 0+60x40
		         credproxy_ready{job="cp", instance="i", namespace="n", pod="p"} 1x40`,
		quiet: `process_start_time_seconds{job="cp", instance="i", namespace="n", pod="p"} 100x40
		        credproxy_ready{job="cp", instance="i", namespace="n", pod="p"} 1x40
		        process_start_time_seconds{job="app", instance="j"} 0+60x40`,
	},
	"CredproxyAuthFailures": {
		firing: `credproxy_auth_failures_total{namespace="n", pod="p", protocol="postgres", service="appdb", kind="upstream auth failed"} 0+10x40`,
		quiet:  `credproxy_auth_failures_total{namespace="n", pod="p", protocol="postgres", service="appdb", kind="upstream auth failed"} 3x40`,
	},
	"CredproxyCredentialFetchErrors": {
		firing: `credproxy_credential_fetch_errors_total{namespace="n", pod="p", credential="app-db", kind="unreachable"} 0+2x40`,
		quiet:  `credproxy_credential_fetch_errors_total{namespace="n", pod="p", credential="app-db", kind="unreachable"} 7x40`,
	},
	"CredproxyLeaseRenewalFailures": {
		firing: `credproxy_lease_renewals_total{namespace="n", pod="p", credential="app-db", result="error"} 0+1x40`,
		quiet: `credproxy_lease_renewals_total{namespace="n", pod="p", credential="app-db", result="error"} 2x40
		        credproxy_lease_renewals_total{namespace="n", pod="p", credential="app-db", result="ok"} 0+1x40`,
	},
	"CredproxyRotationFailures": {
		firing: `credproxy_rotations_total{namespace="n", pod="p", credential="app-db", result="error"} 0+1x40`,
		quiet:  `credproxy_rotations_total{namespace="n", pod="p", credential="app-db", result="ok"} 0+1x40`,
	},
	"CredproxyConfigReloadFailed": {
		firing: `credproxy_config_reloads_total{namespace="n", pod="p", result="error"} 0+1x40`,
		quiet:  `credproxy_config_reloads_total{namespace="n", pod="p", result="ok"} 0+1x40`,
	},
	"CredproxySessionErrors": {
		firing: `credproxy_sessions_total{namespace="n", pod="p", protocol="postgres", service="appdb", result="ok"} 0+10x40
		         credproxy_sessions_total{namespace="n", pod="p", protocol="postgres", service="appdb", result="error"} 0+5x40`,
		quiet: `credproxy_sessions_total{namespace="n", pod="p", protocol="postgres", service="appdb", result="ok"} 0+100x40
		        credproxy_sessions_total{namespace="n", pod="p", protocol="postgres", service="appdb", result="error"} 0+1x40`,
	},
	"CredproxyUpstreamConnectSlow": {
		firing: `credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="0.5"} 0+1x40
		         credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="5"} 0+10x40
		         credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="+Inf"} 0+10x40`,
		quiet: `credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="0.5"} 0+10x40
		        credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="5"} 0+10x40
		        credproxy_upstream_connect_seconds_bucket{namespace="n", protocol="postgres", service="appdb", le="+Inf"} 0+10x40`,
	},
	"CredproxyRefusingConnections": {
		firing: `credproxy_connections_refused_total{namespace="n", pod="p", protocol="postgres", service="appdb", reason="max_sessions"} 0+10x40`,
		quiet:  `credproxy_connections_refused_total{namespace="n", pod="p", protocol="postgres", service="appdb", reason="max_sessions"} 12x40`,
	},
	"CredproxyMigrationsCutSessions": {
		firing: `credproxy_migrations_total{namespace="n", pod="p", service="appdb", result="ok"} 0+10x40
		         credproxy_migrations_total{namespace="n", pod="p", service="appdb", result="ended_at_deadline"} 0+1x40`,
		quiet: `credproxy_migrations_total{namespace="n", pod="p", service="appdb", result="ok"} 0+10x40
		        credproxy_migrations_total{namespace="n", pod="p", service="appdb", result="failed"} 0+1x40
		        credproxy_migrations_total{namespace="n", pod="p", service="appdb", result="ended_unmovable_state"} 3x40`,
	},
	"CredproxyHTTPUpstreamErrors": {
		firing: `credproxy_http_requests_total{namespace="n", route="api.github.com", code="200", injected="true"} 0+10x40
		         credproxy_http_requests_total{namespace="n", route="api.github.com", code="502", injected="true"} 0+5x40`,
		quiet: `credproxy_http_requests_total{namespace="n", route="api.github.com", code="200", injected="true"} 0+100x40
		        credproxy_http_requests_total{namespace="n", route="api.github.com", code="502", injected="true"} 4x40`,
	},
}

// TestAlertsFire evaluates each alert's expression with Prometheus' own
// engine: on its failure scenario it must hold at every minute of its `for`
// window (so the alert would fire), on the healthy one at none.
func TestAlertsFire(t *testing.T) {
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1_000_000, Timeout: time.Minute, LookbackDelta: 5 * time.Minute})
	end := 40 * time.Minute
	eval := func(t *testing.T, st storage.Queryable, expr string, at time.Duration) int {
		t.Helper()
		ctx := context.Background()
		q, err := engine.NewInstantQuery(ctx, st, nil, expr, time.Unix(0, 0).Add(at))
		if err != nil {
			t.Fatalf("%q: %v", expr, err)
		}
		defer q.Close()
		res := q.Exec(ctx)
		if res.Err != nil {
			t.Fatalf("%q: %v", expr, res.Err)
		}
		v, err := res.Vector()
		if err != nil {
			t.Fatalf("%q: %v", expr, err)
		}
		return len(v)
	}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			sc, ok := alertScenarios[r.Alert]
			if !ok {
				t.Errorf("alert %s has no scenario in alertScenarios", r.Alert)
				continue
			}
			t.Run(r.Alert, func(t *testing.T) {
				firing, quiet := memStorage(t, sc.firing), memStorage(t, sc.quiet)
				hold := time.Duration(r.For)
				for at := end - hold; at <= end; at += time.Minute {
					if eval(t, firing, r.Expr, at) == 0 {
						t.Errorf("does not hold at %v on its failure scenario, so it would not fire (for: %v)", at, hold)
					}
					if n := eval(t, quiet, r.Expr, at); n != 0 {
						t.Errorf("holds for %d series at %v on a healthy credproxy", n, at)
					}
				}
			})
		}
	}
}

// memStorage is a read-only in-memory Prometheus storage holding series
// written as in promtool's rule tests ("name{labels} 0+1x40"), one sample a
// minute from time 0.
func memStorage(t *testing.T, series string) storage.Queryable {
	t.Helper()
	var all []storage.Series
	for _, line := range strings.Split(series, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		lset, values, err := promqlParser.ParseSeriesDesc(line)
		if err != nil {
			t.Fatalf("series %q: %v", line, err)
		}
		var samples []chunks.Sample
		for i, v := range values {
			if !v.Omitted {
				samples = append(samples, floatSample{t: int64(i) * time.Minute.Milliseconds(), f: v.Value})
			}
		}
		all = append(all, storage.NewListSeries(lset, samples))
	}
	slices.SortFunc(all, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	querier := &storage.MockQuerier{SelectMockFunction: func(_ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
		var out []storage.Series
		for _, s := range all {
			if slices.IndexFunc(ms, func(m *labels.Matcher) bool { return !m.Matches(s.Labels().Get(m.Name)) }) < 0 {
				out = append(out, s)
			}
		}
		return &seriesSet{series: out, i: -1}
	}}
	return &storage.MockQueryable{MockQuerier: querier}
}

type seriesSet struct {
	series []storage.Series
	i      int
}

func (s *seriesSet) Next() bool                        { s.i++; return s.i < len(s.series) }
func (s *seriesSet) At() storage.Series                { return s.series[s.i] }
func (s *seriesSet) Err() error                        { return nil }
func (s *seriesSet) Warnings() annotations.Annotations { return nil }

// floatSample is one float sample.
type floatSample struct {
	t int64
	f float64
}

func (s floatSample) T() int64                      { return s.t }
func (s floatSample) ST() int64                     { return 0 }
func (s floatSample) F() float64                    { return s.f }
func (s floatSample) H() *histogram.Histogram       { return nil }
func (s floatSample) FH() *histogram.FloatHistogram { return nil }
func (s floatSample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s floatSample) Copy() chunks.Sample           { return s }
