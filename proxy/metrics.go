package proxy

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/credproxy/credproxy/protocols/postgres"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Metrics are credproxy's Prometheus metrics. The names are an interface:
// the dashboard and alert rules in deploy/monitoring use them. Labels are
// bounded: service, route and credential names from the config, and fixed
// kinds and results; never an error string, a user name or an address.
type Metrics struct {
	Registry *prometheus.Registry

	sessionsActive   *prometheus.GaugeVec
	sessionsTotal    *prometheus.CounterVec
	sessionDuration  *prometheus.HistogramVec
	bytesTotal       *prometheus.CounterVec
	upstreamConnect  *prometheus.HistogramVec
	authFailures     *prometheus.CounterVec
	credentialFetch  *prometheus.HistogramVec
	credentialErrors *prometheus.CounterVec
	leasesActive     *prometheus.GaugeVec
	leaseRenewals    *prometheus.CounterVec
	rotations        *prometheus.CounterVec
	httpRequests     *prometheus.CounterVec
	configReloads    *prometheus.CounterVec
	migrations       *prometheus.CounterVec
	migrationSwap    *prometheus.HistogramVec
	refused          *prometheus.CounterVec
	timeouts         *prometheus.CounterVec
}

// NewMetrics registers every metric, with the Go and process collectors, on
// a registry of its own.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := factory{reg}
	latency := []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	m := &Metrics{
		Registry:         reg,
		sessionsActive:   f.gauge("sessions_active", "Sessions open now.", "protocol", "service"),
		sessionsTotal:    f.counter("sessions_total", "Sessions by how they ended: ok, error, or denied before they started.", "protocol", "service", "result"),
		sessionDuration:  f.histogram("session_duration_seconds", "How long sessions lasted.", prometheus.ExponentialBuckets(0.01, 4, 10), "protocol", "service"),
		bytesTotal:       f.counter("bytes_total", "Bytes relayed; in is from the app, out is to the app.", "protocol", "service", "direction"),
		upstreamConnect:  f.histogram("upstream_connect_seconds", "Upstream dial, TLS and login time.", latency, "protocol", "service"),
		authFailures:     f.counter("auth_failures_total", "Sessions refused, by kind.", "protocol", "service", "kind"),
		credentialFetch:  f.histogram("credential_fetch_seconds", "Time to fetch a credential from its source, retries included.", latency, "credential"),
		credentialErrors: f.counter("credential_fetch_errors_total", "Failed credential fetches.", "credential", "kind"),
		leasesActive:     f.gauge("leases_active", "Leases credproxy holds.", "credential"),
		leaseRenewals:    f.counter("lease_renewals_total", "Lease renewals by result.", "credential", "result"),
		rotations:        f.counter("rotations_total", "Credentials replaced for new sessions.", "credential", "result"),
		httpRequests:     f.counter("http_requests_total", "HTTP proxy requests by route, status code and whether a credential was injected.", "route", "code", "injected"),
		configReloads:    f.counter("config_reloads_total", "Config reloads by result.", "result"),
		migrations: f.counter("migrations_total", "Postgres sessions moved to a fresh credential, by result: ok, "+
			"ended_unmovable_state, ended_at_deadline, or failed (an attempt that will be retried).", "service", "result"),
		migrationSwap: f.histogram("migration_swap_seconds", "How long a migration held the session: reading its state, "+
			"re-creating it on the new connection and swapping.", latency, "service"),
		refused: f.counter("connections_refused_total", "Connections and requests turned away by credproxy's own limits "+
			"(max_connections, max_sessions, max_handshakes, max_upstream_connections) or its tunnel deny list (destination_denied).",
			"protocol", "service", "reason"),
		timeouts: f.counter("timeouts_total", "Requests ended by a timeout, by kind (body_read).", "protocol", "service", "kind"),
	}
	return m
}

// registerReady adds credproxy_ready, computed at each scrape from the same
// checks as /readyz, so it never goes stale.
func (m *Metrics) registerReady(ready func() bool) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "credproxy", Name: "ready", Help: "1 when /readyz answers 200.",
	}, func() float64 {
		if ready() {
			return 1
		}
		return 0
	}))
}

type factory struct{ reg *prometheus.Registry }

func (f factory) gauge(name, help string, labels ...string) *prometheus.GaugeVec {
	v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "credproxy", Name: name, Help: help}, labels)
	f.reg.MustRegister(v)
	return v
}

func (f factory) counter(name, help string, labels ...string) *prometheus.CounterVec {
	v := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "credproxy", Name: name, Help: help}, labels)
	f.reg.MustRegister(v)
	return v
}

func (f factory) histogram(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	v := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "credproxy", Name: name, Help: help, Buckets: buckets}, labels)
	f.reg.MustRegister(v)
	return v
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

// postgresObserver adapts Metrics to protocols/postgres.Observer.
type postgresObserver struct{ m *Metrics }

func (o postgresObserver) SessionStarted(service string) {
	o.m.sessionsActive.WithLabelValues("postgres", service).Inc()
}

func (o postgresObserver) SessionEnded(service, res string, d time.Duration, in, out int64) {
	o.m.sessionsActive.WithLabelValues("postgres", service).Dec()
	o.m.sessionsTotal.WithLabelValues("postgres", service, res).Inc()
	o.m.sessionDuration.WithLabelValues("postgres", service).Observe(d.Seconds())
	o.m.bytesTotal.WithLabelValues("postgres", service, "in").Add(float64(in))
	o.m.bytesTotal.WithLabelValues("postgres", service, "out").Add(float64(out))
}

func (o postgresObserver) Denied(service, kind string) {
	o.m.sessionsTotal.WithLabelValues("postgres", service, "denied").Inc()
	// A client that sends garbage (or a TCP health check that connects and
	// closes), or one turned away over a limit, is not an authentication
	// failure worth alerting on.
	if kind != postgres.KindBadStartup && kind != postgres.KindTooManyClients {
		o.m.authFailures.WithLabelValues("postgres", service, kind).Inc()
	}
}

func (o postgresObserver) Refused(service, reason string) {
	o.m.refused.WithLabelValues("postgres", service, reason).Inc()
}

func (o postgresObserver) Migrated(service, result string, swap time.Duration) {
	o.m.migrations.WithLabelValues(service, result).Inc()
	if result == postgres.MigrationOK {
		o.m.migrationSwap.WithLabelValues(service).Observe(swap.Seconds())
	}
}

func (o postgresObserver) UpstreamConnected(service string, d time.Duration) {
	o.m.upstreamConnect.WithLabelValues("postgres", service).Observe(d.Seconds())
}

// credentialObserver adapts Metrics to credentials.Observer.
type credentialObserver struct{ m *Metrics }

func (o credentialObserver) Fetched(name string, d time.Duration, err error) {
	o.m.credentialFetch.WithLabelValues(name).Observe(d.Seconds())
	if err != nil {
		o.m.credentialErrors.WithLabelValues(name, credentials.KindOf(err).String()).Inc()
	}
}

func (o credentialObserver) Renewed(name string, err error) {
	o.m.leaseRenewals.WithLabelValues(name, result(err)).Inc()
}

func (o credentialObserver) Rotated(name string, err error) {
	o.m.rotations.WithLabelValues(name, result(err)).Inc()
}

func (o credentialObserver) LeasesActive(name string, n int) {
	o.m.leasesActive.WithLabelValues(name).Set(float64(n))
}

// httpObserver adapts Metrics to the HTTP proxy's Observer.
type httpObserver struct{ m *Metrics }

func (o httpObserver) Request(route string, code int, injected bool) {
	if route == "" {
		route = "none" // no route matched: bounded, and distinct from any host
	}
	o.m.httpRequests.WithLabelValues(route, strconv.Itoa(code), strconv.FormatBool(injected)).Inc()
}

// Refused labels a refusal by the route, or "http" (the listener's
// service name) for one that concerns no route.
func (o httpObserver) Refused(route, reason string) {
	if route == "" {
		route = "http"
	}
	o.m.refused.WithLabelValues("http", route, reason).Inc()
}

func (o httpObserver) TimedOut(route, kind string) {
	if route == "" {
		route = "http"
	}
	o.m.timeouts.WithLabelValues("http", route, kind).Inc()
}
