package proxy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// poolMetrics are Postgres server-connection reuse's (postgres[].pool).
type poolMetrics struct {
	conns    *prometheus.GaugeVec
	acquires *prometheus.CounterVec
	waits    *prometheus.CounterVec
	waitTime *prometheus.HistogramVec
	closed   *prometheus.CounterVec
}

func newPoolMetrics(f factory, latency []float64) *poolMetrics {
	return &poolMetrics{
		conns: f.gauge("pool_server_connections", "Upstream connections of a pooled service, by state: "+
			"idle (in the pool) or active (serving a session, or being logged in).", "protocol", "service", "state"),
		acquires: f.counter("pool_acquires_total", "Sessions of a pooled service by how they got an upstream connection: "+
			"hit (an idle one was reused), miss (a new one was logged in), timeout (none free within pool.wait_timeout).",
			"protocol", "service", "result"),
		waits: f.counter("pool_waits_total", "Sessions that waited for a free upstream connection (pool.max_server_connections reached).",
			"protocol", "service"),
		waitTime: f.histogram("pool_wait_seconds", "How long sessions waited for a free upstream connection.", latency,
			"protocol", "service"),
		closed: f.counter("pool_closed_total", "Pooled upstream connections closed, by reason: idle_timeout, max_lifetime, "+
			"lease (credential retired or ended), stale (credential replaced), evicted (room for another key), "+
			"unclean (the session left it in a state that cannot be reset), reset_failed, broken, open_files (no room in the open-file budget to keep it idle), shutdown.",
			"protocol", "service", "reason"),
	}
}

// PoolConns moves a pooled service's connection counts by the deltas
// given (deltas, so that an old and a new handler of one service over a
// reload add up).
func (m *Metrics) PoolConns(protocol, service string, idle, active int) {
	if m == nil {
		return
	}
	if idle != 0 {
		m.pool.conns.WithLabelValues(protocol, service, "idle").Add(float64(idle))
	}
	if active != 0 {
		m.pool.conns.WithLabelValues(protocol, service, "active").Add(float64(active))
	}
}

// PoolAcquired counts how a session got its upstream connection; waited
// says whether it had to wait, and wait for how long.
func (m *Metrics) PoolAcquired(protocol, service, result string, wait time.Duration, waited bool) {
	if m == nil {
		return
	}
	m.pool.acquires.WithLabelValues(protocol, service, result).Inc()
	if waited {
		m.pool.waits.WithLabelValues(protocol, service).Inc()
		m.pool.waitTime.WithLabelValues(protocol, service).Observe(wait.Seconds())
	}
}

// PoolClosed counts a pooled upstream connection closed for reason.
func (m *Metrics) PoolClosed(protocol, service, reason string) {
	if m == nil {
		return
	}
	m.pool.closed.WithLabelValues(protocol, service, reason).Inc()
}
