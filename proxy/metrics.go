package proxy

import (
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

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
	pool             *poolMetrics
	workloads        *workloadMetrics

	names []string // every credproxy_* family, for Names
}

// NewMetrics registers every metric, with the Go and process collectors, on
// a registry of its own.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var names []string
	f := factory{reg, &names}
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
		timeouts:  f.counter("timeouts_total", "Requests ended by a timeout, by kind (body_read).", "protocol", "service", "kind"),
		pool:      newPoolMetrics(f, latency),
		workloads: newWorkloadMetrics(f),
	}
	m.names = names
	return m
}

// Names lists every credproxy_* metric family this build can export,
// whether or not a series exists yet: the names deploy/monitoring must
// know (a test checks metrics.txt against it).
func (m *Metrics) Names() []string {
	names := append([]string{"credproxy_ready", "credproxy_audit_waiting_records"}, m.names...)
	slices.Sort(names)
	return names
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

// registerAuditWaiting adds credproxy_audit_waiting_records: records
// handed to the audit log that wait for the one being written, each
// holding back its session (the audit log never drops a record).
func (m *Metrics) registerAuditWaiting(waiting func() int) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "credproxy", Name: "audit_waiting_records",
		Help: "Audit records waiting to be written; their sessions wait with them.",
	}, func() float64 { return float64(waiting()) }))
}

// factory registers credproxy's metrics and notes their names.
type factory struct {
	reg   *prometheus.Registry
	names *[]string
}

func (f factory) note(name string) {
	if f.names != nil {
		*f.names = append(*f.names, "credproxy_"+name)
	}
}

func (f factory) gauge(name, help string, labels ...string) *prometheus.GaugeVec {
	f.note(name)
	v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "credproxy", Name: name, Help: help}, labels)
	f.reg.MustRegister(v)
	return v
}

func (f factory) counter(name, help string, labels ...string) *prometheus.CounterVec {
	f.note(name)
	v := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "credproxy", Name: name, Help: help}, labels)
	f.reg.MustRegister(v)
	return v
}

func (f factory) histogram(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	f.note(name)
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

// The methods below are what protocols and the credential store count
// with. Each is safe for concurrent use and does nothing on a nil
// *Metrics, so a handler built without metrics (a test, Check) needs no
// stand-in. The protocol and service labels are the caller's: "postgres"
// and the service name, "http" and the route host (or "http" for the
// listener as a whole).

// SessionStarted counts a session handed to its app.
func (m *Metrics) SessionStarted(protocol, service string) {
	if m == nil {
		return
	}
	m.sessionsActive.WithLabelValues(protocol, service).Inc()
}

// SessionEnded follows every SessionStarted; result is "ok" or "error",
// in and out the bytes from and to the app.
func (m *Metrics) SessionEnded(protocol, service, result string, d time.Duration, in, out int64) {
	if m == nil {
		return
	}
	m.sessionsActive.WithLabelValues(protocol, service).Dec()
	m.sessionsTotal.WithLabelValues(protocol, service, result).Inc()
	m.sessionDuration.WithLabelValues(protocol, service).Observe(d.Seconds())
	m.bytesTotal.WithLabelValues(protocol, service, "in").Add(float64(in))
	m.bytesTotal.WithLabelValues(protocol, service, "out").Add(float64(out))
}

// Denied counts a session refused before it started, with kind a fixed
// deny kind of the protocol's. authFailure also counts it in
// auth_failures_total: the protocol says which refusals are worth
// alerting on (not a client that sends garbage, nor one over a limit).
func (m *Metrics) Denied(protocol, service, kind string, authFailure bool) {
	if m == nil {
		return
	}
	m.sessionsTotal.WithLabelValues(protocol, service, "denied").Inc()
	if authFailure {
		m.authFailures.WithLabelValues(protocol, service, kind).Inc()
	}
}

// UpstreamConnected records how long the upstream dial, TLS and login took.
func (m *Metrics) UpstreamConnected(protocol, service string, d time.Duration) {
	if m == nil {
		return
	}
	m.upstreamConnect.WithLabelValues(protocol, service).Observe(d.Seconds())
}

// Refused counts a connection or request turned away by one of
// credproxy's own limits or its tunnel deny list; reason names which.
func (m *Metrics) Refused(protocol, service, reason string) {
	if m == nil {
		return
	}
	m.refused.WithLabelValues(protocol, service, reason).Inc()
}

// TimedOut counts a request ended by a timeout of the given kind.
func (m *Metrics) TimedOut(protocol, service, kind string) {
	if m == nil {
		return
	}
	m.timeouts.WithLabelValues(protocol, service, kind).Inc()
}

// Migrated counts a Postgres session's move to a fresh credential by
// result; for result "ok", swap is how long the move held the session.
func (m *Metrics) Migrated(service, result string, swap time.Duration) {
	if m == nil {
		return
	}
	m.migrations.WithLabelValues(service, result).Inc()
	if result == "ok" {
		m.migrationSwap.WithLabelValues(service).Observe(swap.Seconds())
	}
}

// HTTPRequest counts an HTTP proxy request by route, status code and
// whether a credential was injected.
func (m *Metrics) HTTPRequest(route string, code int, injected bool) {
	if m == nil {
		return
	}
	m.httpRequests.WithLabelValues(route, strconv.Itoa(code), strconv.FormatBool(injected)).Inc()
}

// Metrics is the credential store's credentials.Observer.
var _ credentials.Observer = (*Metrics)(nil)

// Fetched records a fetch from a credential's source, and its failure by
// kind.
func (m *Metrics) Fetched(name string, d time.Duration, err error) {
	if m == nil {
		return
	}
	m.credentialFetch.WithLabelValues(name).Observe(d.Seconds())
	if err != nil {
		m.credentialErrors.WithLabelValues(name, credentials.KindOf(err).String()).Inc()
	}
}

// Renewed counts a lease renewal by result.
func (m *Metrics) Renewed(name string, err error) {
	if m == nil {
		return
	}
	m.leaseRenewals.WithLabelValues(name, result(err)).Inc()
}

// Rotated counts a credential replaced for new sessions, by result.
func (m *Metrics) Rotated(name string, err error) {
	if m == nil {
		return
	}
	m.rotations.WithLabelValues(name, result(err)).Inc()
}

// LeasesActive sets how many leases credproxy holds for a credential.
func (m *Metrics) LeasesActive(name string, n int) {
	if m == nil {
		return
	}
	m.leasesActive.WithLabelValues(name).Set(float64(n))
}
