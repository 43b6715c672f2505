package credentials

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"

	vault "github.com/hashicorp/vault/api"
)

// Kind says why a credential could not be fetched, renewed or revoked. It
// decides retries and metric labels; the message never does, so rewording
// an error cannot change what credproxy does.
type Kind uint8

// Kinds of failure. Their String values are metric label values: the
// dashboard and the alert rules in deploy/monitoring use them.
const (
	KindOther       Kind = iota
	KindUnreachable      // the source did not answer: network error, Vault sealed or failing (5xx)
	KindTimeout          // the source did not answer in time
	KindDenied           // the source refused: permission denied (403)
	KindLogin            // credproxy could not log in to the source
	KindNotFound         // nothing at the path (404)
)

var kindNames = [...]string{
	KindOther:       "other",
	KindUnreachable: "unreachable",
	KindTimeout:     "timeout",
	KindDenied:      "permission_denied",
	KindLogin:       "login",
	KindNotFound:    "not_found",
}

// String is the kind's metric label value.
func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return kindNames[KindOther]
}

// Retryable reports whether asking again soon may succeed: the source was
// unreachable or slow. A refusal, a missing path or a failed login will
// not change within one fetch's retries.
func (k Kind) Retryable() bool { return k == KindUnreachable || k == KindTimeout }

// Error is a failure of a credential source. Msg is safe to show a client,
// log and audit: it is scrubbed of secrets when the Error is built. Err is
// the cause, kept for errors.Is and errors.As only; its own text may hold
// what Msg leaves out (a request URL, a lease id) and is never printed.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string { return e.Msg }

func (e *Error) Unwrap() error { return e.Err }

// wrapf prefixes a source error's message, keeping its kind and cause.
// Errors that are not *Error (local sources) are classified by KindOf.
func wrapf(err error, format string, args ...any) *Error {
	prefix := fmt.Sprintf(format, args...)
	var e *Error
	if errors.As(err, &e) {
		return &Error{Kind: e.Kind, Msg: prefix + ": " + e.Msg, Err: e}
	}
	return &Error{Kind: KindOf(err), Msg: prefix + ": " + err.Error(), Err: err}
}

// KindOf classifies err: by its *Error when it has one, else by the
// standard library's types (a deadline, a network error).
func KindOf(err error) Kind {
	var e *Error
	var ne net.Error
	switch {
	case err == nil:
		return KindOther
	case errors.As(err, &e):
		return e.Kind
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return KindTimeout
	case errors.As(err, &ne):
		if ne.Timeout() {
			return KindTimeout
		}
		return KindUnreachable
	}
	return KindOther
}

// vaultError turns an error from the Vault client into an *Error: Vault's
// answer (status and messages) or the network failure, without the
// request URL; each of secrets still present is replaced by its hash.
func vaultError(err error, secrets ...string) *Error {
	var (
		e  *Error
		re *vault.ResponseError
		ne net.Error
	)
	out := &Error{Kind: KindOf(err), Msg: err.Error(), Err: err}
	switch {
	case errors.As(err, &e):
		return e // built (and scrubbed) already
	case errors.As(err, &re):
		out.Msg = fmt.Sprintf("%d %s", re.StatusCode, strings.Join(re.Errors, "; "))
		if len(re.Errors) == 0 {
			out.Msg = fmt.Sprintf("HTTP %d", re.StatusCode)
		}
		switch {
		case re.StatusCode == http.StatusForbidden:
			out.Kind = KindDenied
		case re.StatusCode == http.StatusNotFound:
			out.Kind = KindNotFound
		case re.StatusCode >= 500:
			out.Kind = KindUnreachable
		}
	case errors.As(err, &ne):
		out.Msg = "vault unreachable: " + ne.Error()
		var ue *url.Error
		if errors.As(err, &ue) {
			out.Msg = "vault unreachable: " + ue.Err.Error()
		}
	}
	for _, s := range secrets {
		if s != "" {
			out.Msg = strings.ReplaceAll(out.Msg, s, shortHash(Lease{ID: s}))
		}
	}
	return out
}

// isPermissionDenied reports a 403 from Vault.
func isPermissionDenied(err error) bool {
	var re *vault.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode == http.StatusForbidden
	}
	return KindOf(err) == KindDenied
}
