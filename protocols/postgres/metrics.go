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
)

// Deny kinds: the audit reasons as metric label values.
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
)

var reasonKinds = map[string]string{
	"bad startup":             KindBadStartup,
	"credential unavailable":  KindCredentialUnavailable,
	"upstream unreachable":    KindUpstreamUnreachable,
	"upstream TLS failed":     KindUpstreamTLS,
	"upstream auth failed":    KindUpstreamAuth,
	"upstream error":          KindUpstreamError,
	"upstream timeout":        KindUpstreamTimeout,
	"upstream protocol error": KindUpstreamProtocol,
	"too many clients":        KindTooManyClients,
}

func reasonKind(reason string) string {
	if k, ok := reasonKinds[reason]; ok {
		return k
	}
	return KindInternal
}

// denied counts a session refused before it started, for the audit
// reason given. A client that sends garbage (or a TCP health check that
// connects and closes), or one turned away over a limit, is not an
// authentication failure worth alerting on.
func (h *Handler) denied(reason string) {
	kind := reasonKind(reason)
	h.obs.Denied(protocolName, h.cfg.Name, kind, kind != KindBadStartup && kind != KindTooManyClients)
}
