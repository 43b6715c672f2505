package postgres

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy"
)

// failKind says why a session could not be established. It decides the
// audit reason, the metric kind, whether the refusal counts as an
// authentication failure, the SQLSTATE where credproxy chooses one, and
// whether a fresh credential may help; the message never does, so
// rewording an error cannot change what credproxy does (as pgconn's
// SafeToRetry and Timeout answer from types, not text).
type failKind uint8

// Kinds of failure. Their reasons and metric kinds are an interface: the
// audit log's `reason`, and the `kind` label that the dashboard and the
// alert rules in deploy/monitoring use. Add kinds; never reword one.
const (
	failInternal     failKind = iota
	failBadStartup            // the app's startup was broken, stalled or not supported
	failTooMany               // over max_sessions, max_handshakes or the open-file budget
	failCredential            // the credential could not be had or lacks a field
	failUnreachable           // the upstream did not accept the TCP connection
	failTimeout               // the upstream accepted it, then did not finish the handshake in time
	failTLS                   // upstream TLS refused or failed
	failAuth                  // the upstream refused the injected credential
	failRefused               // the upstream refused the session otherwise; its error is passed on
	failProtocol              // the upstream broke the protocol during the handshake
	failShutdown              // credproxy shut down during the handshake
	failReplication           // a replication connection to a service without allow_replication
	failClientTLS             // plaintext to a service whose client_tls requires TLS
	failUnattributed          // DaemonSet mode: the connection could not be tied to its socket's pod
	failPeerMismatch          // DaemonSet mode: the process behind it is not in its socket's pod
	failNotAllowed            // DaemonSet mode: no workloads rule allows the pod this service
)

// failInfo is what a kind decides.
type failInfo struct {
	reason string // the audit record's reason
	metric string // the credproxy_auth_failures_total kind label
	// authFailure: counted in credproxy_auth_failures_total, which alerts.
	// Not a client that sends garbage, one turned away over a limit, a
	// plaintext client where TLS is required, nor a shutdown.
	authFailure bool
}

var failInfos = [...]failInfo{
	failInternal:    {"internal error", KindInternal, true},
	failBadStartup:  {"bad startup", KindBadStartup, false},
	failTooMany:     {"too many clients", KindTooManyClients, false},
	failCredential:  {"credential unavailable", KindCredentialUnavailable, true},
	failUnreachable: {"upstream unreachable", KindUpstreamUnreachable, true},
	failTimeout:     {"upstream timeout", KindUpstreamTimeout, true},
	failTLS:         {"upstream TLS failed", KindUpstreamTLS, true},
	failAuth:        {"upstream auth failed", KindUpstreamAuth, true},
	failRefused:     {"upstream error", KindUpstreamError, true},
	failProtocol:    {"upstream protocol error", KindUpstreamProtocol, true},
	failShutdown:    {"shutdown", KindShutdown, false},
	failReplication: {"replication not allowed", KindReplicationRefused, true},
	failClientTLS:   {"client TLS required", KindClientTLSRequired, false},
	// The reasons are proxy.WorkloadError's (identity.Reason*), shared
	// with the HTTP proxy.
	failUnattributed: {identity.ReasonUnattributed, KindUnattributed, true},
	failPeerMismatch: {identity.ReasonPeerMismatch, KindPeerMismatch, true},
	failNotAllowed:   {identity.ReasonNotAllowed, KindWorkloadNotAllowed, true},
}

func (k failKind) info() failInfo {
	if int(k) < len(failInfos) {
		return failInfos[k]
	}
	return failInfos[failInternal]
}

// reason is the kind's audit reason.
func (k failKind) reason() string { return k.info().reason }

// freshCredentialMayHelp reports whether logging in again with a freshly
// fetched credential may succeed: the upstream refused the credential,
// which a leased one revoked out of band explains. Nothing else about the
// upstream changes with a new credential.
func (k failKind) freshCredentialMayHelp() bool { return k == failAuth }

// kindOf classifies err by its type: *upstreamError, *startupError,
// *tooManyError; anything else is internal.
func kindOf(err error) failKind {
	var (
		ue *upstreamError
		se *startupError
		tm *tooManyError
		we *proxy.WorkloadError
	)
	switch {
	case errors.As(err, &ue):
		return ue.kind
	case errors.As(err, &se):
		return se.failKind()
	case errors.As(err, &tm):
		return failTooMany
	case errors.As(err, &we):
		return workloadKind(we)
	}
	return failInternal
}

// workloadKind is a DaemonSet-mode refusal's kind, from its reason.
func workloadKind(we *proxy.WorkloadError) failKind {
	switch we.Reason {
	case identity.ReasonPeerMismatch:
		return failPeerMismatch
	case identity.ReasonNotAllowed:
		return failNotAllowed
	}
	return failUnattributed
}

// isTimeout reports whether err is a deadline running out: one of the
// handshake's own (a connection deadline, a context's) or a net.Error
// that says so.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// upstreamError is a failure to get a credential or to reach or log in to
// the upstream. msg is what the client is told (after "credproxy: "),
// logged and audited; it is built once, scrubbed of secrets, when the
// error is made (newUpstreamError). err is the cause, for errors.Is and
// errors.As only.
type upstreamError struct {
	kind failKind
	code string // SQLSTATE for the client
	msg  string
	err  error
	// resp is an ErrorResponse from the upstream to pass on unchanged.
	resp *pgproto3.ErrorResponse
}

// newUpstreamError builds an upstreamError whose message is msg, then
// ": " and the cause's text when there is a cause, with every non-empty
// secret in it replaced by REDACTED.
func newUpstreamError(kind failKind, code, msg string, cause error, secrets ...string) *upstreamError {
	if cause != nil {
		msg += ": " + cause.Error()
	}
	return &upstreamError{kind: kind, code: code, msg: scrub(msg, secrets...), err: cause}
}

func (e *upstreamError) Error() string { return e.msg }

func (e *upstreamError) Unwrap() error { return e.err }

// scrub replaces each non-empty secret in s with REDACTED.
func scrub(s string, secrets ...string) string {
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, "REDACTED")
		}
	}
	return s
}
