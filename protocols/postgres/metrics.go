package postgres

// What the handler counts in the engine's metrics (proxy.Metrics), with
// the protocol label "postgres" and the service's name. Label values are
// bounded: the service names from the config and the fixed values below,
// never an error string or a user.

// protocolName is the protocol label of every metric and audit record.
const protocolName = "postgres"

// Refusal reasons: the limit that was reached, as metric label values.
const (
	RefusedMaxSessions   = "max_sessions"
	RefusedMaxHandshakes = "max_handshakes"
	RefusedOpenFiles     = "open_files"
)

// Deny kinds: the metric label values of failKind (errors.go).
const (
	KindBadStartup            = "bad_startup"
	KindCredentialUnavailable = "credential_unavailable"
	KindUpstreamUnreachable   = "upstream_unreachable"
	KindUpstreamTLS           = "upstream_tls"
	KindUpstreamAuth          = "upstream_auth"
	KindUpstreamError         = "upstream_error"
	KindUpstreamTimeout       = "upstream_timeout"
	KindUpstreamProtocol      = "upstream_protocol"
	KindTooManyClients        = "too_many_clients"
	KindInternal              = "internal"
	KindShutdown              = "shutdown"
	KindReplicationRefused    = "replication_refused"
	KindClientTLSRequired     = "client_tls_required"
	KindUnattributed          = "unattributed"
	KindPeerMismatch          = "peer_mismatch"
	KindWorkloadNotAllowed    = "workload_not_allowed"
)

// denied counts a session refused before it started, by the kind of its
// failure.
func (h *Handler) denied(kind failKind) {
	info := kind.info()
	h.obs.Denied(protocolName, h.cfg.Name, info.metric, info.authFailure)
}
