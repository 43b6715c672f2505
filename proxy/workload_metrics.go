package proxy

import "github.com/prometheus/client_golang/prometheus"

// workloadMetrics count DaemonSet mode's pods and decisions by namespace
// and service account. The label values are those of a workloads rule
// (bounded by the config); pods no rule matches count under "" and "",
// so no pod can add a series by its name. The labels are
// workload_namespace and workload_service_account: Prometheus' Kubernetes
// discovery gives every series credproxy's own namespace label.
type workloadMetrics struct {
	published   *prometheus.GaugeVec
	connections *prometheus.CounterVec
}

func newWorkloadMetrics(f factory) *workloadMetrics {
	return &workloadMetrics{
		published: f.gauge("workloads_published", "Pods published on this node by the CSI node plugin, by the "+
			"namespace and service account of their workloads rule (\"\" for pods no rule matches).", "workload_namespace", "workload_service_account"),
		connections: f.counter("workload_decisions_total", "Connections and requests of pods, by the namespace and service "+
			"account of their rule and the decision: allowed, or the refusal (unattributed, peer mismatch, workload not allowed).",
			"workload_namespace", "workload_service_account", "result"),
	}
}

func (m *Metrics) workloadPublished(namespace, serviceAccount string, delta float64) {
	if m == nil || m.workloads == nil {
		return
	}
	m.workloads.published.WithLabelValues(namespace, serviceAccount).Add(delta)
}

func (m *Metrics) workloadConnection(namespace, serviceAccount, result string) {
	if m == nil || m.workloads == nil {
		return
	}
	m.workloads.connections.WithLabelValues(namespace, serviceAccount, result).Inc()
}
