package postgres

import "time"

// Observer hears about sessions, for metrics. Implementations must be cheap
// and safe for concurrent use. Labels passed are bounded: service names from
// the config and the fixed kinds below, never an error string or a user.
type Observer interface {
	// SessionStarted is called once the app has been handed the session.
	SessionStarted(service string)
	// SessionEnded follows every SessionStarted; result is "ok" or "error".
	SessionEnded(service, result string, d time.Duration, bytesIn, bytesOut int64)
	// Denied is called for a session refused before it started, with kind
	// one of the deny kinds below.
	Denied(service, kind string)
	// UpstreamConnected reports how long dial, TLS and login took.
	UpstreamConnected(service string, d time.Duration)
	// Migrated reports a migration's outcome (one of the Migration*
	// results) and, for ok, how long the swap held the session.
	Migrated(service, result string, swap time.Duration)
	// Refused counts a connection turned away over a limit, with reason
	// RefusedMaxSessions or RefusedMaxHandshakes; Denied is called too.
	Refused(service, reason string)
}

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

// nopObserver is used when Options.Observer is nil.
type nopObserver struct{}

func (nopObserver) SessionStarted(string)                                    {}
func (nopObserver) SessionEnded(string, string, time.Duration, int64, int64) {}
func (nopObserver) Denied(string, string)                                    {}
func (nopObserver) UpstreamConnected(string, time.Duration)                  {}
func (nopObserver) Migrated(string, string, time.Duration)                   {}
func (nopObserver) Refused(string, string)                                   {}
