package httpproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
)

// Upstream connections: the dial, the TLS handshake, and what their
// failures are. credproxy performs the upstream TLS handshake itself (the
// transports' DialTLSContext) so that a failed handshake is a
// *TLSHandshakeError where it happens: the audit reason, the status and
// the message's wording come from the error's type, never from its text
// (classifyUpstream), so a reworded message from crypto/tls or net/http
// changes nothing.

// upstreamSessionCache bounds the TLS sessions kept for resumption toward
// upstreams: one per host (server name) is enough for keep-alive pools,
// and a few per host for bursts of new connections.
const upstreamSessionCache = 1024

// DialError is a failed TCP connection to an upstream. Its text is the
// dialer's.
type DialError struct {
	Addr string
	Err  error
}

func (e *DialError) Error() string { return e.Err.Error() }
func (e *DialError) Unwrap() error { return e.Err }

// TLSHandshakeError is a failed TLS handshake with an upstream that was
// reached: it does not speak TLS, it sent an alert, its certificate did
// not verify (the wrapped error then also matches
// *tls.CertificateVerificationError), or the handshake broke off. A
// handshake cut short by the request's context (a timeout, the client
// leaving) is not one: it is reported as the context's error. Its text is
// crypto/tls's.
type TLSHandshakeError struct {
	Addr string
	Err  error
}

func (e *TLSHandshakeError) Error() string { return e.Err.Error() }
func (e *TLSHandshakeError) Unwrap() error { return e.Err }

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// typedDial returns dial with its failures wrapped in *DialError; errors
// of credproxy's own bounds and deny list keep their types underneath.
func typedDial(dial dialFunc) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			var de *DialError
			if !errors.As(err, &de) {
				err = &DialError{Addr: addr, Err: err}
			}
			return nil, err
		}
		return c, nil
	}
}

// upstreamTLSConfig is the client side of every upstream TLS connection:
// verified against roots, TLS 1.2 or later, HTTP/1.1 by ALPN (the inside
// of every tunnel is HTTP/1.1, and so is what goes upstream), and a
// session cache, so that a new connection to a host seen before resumes
// its session (an abbreviated handshake, no certificate to verify again:
// crypto/tls still checks the cached certificate's host name and expiry).
func upstreamTLSConfig(roots *x509.CertPool) *tls.Config {
	return &tls.Config{
		RootCAs:            roots,
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"http/1.1"},
		ClientSessionCache: tls.NewLRUClientSessionCache(upstreamSessionCache),
	}
}

// dialTLS dials addr and completes a verified TLS handshake with the host
// of addr as server name, within handshakeTimeout: the transports'
// DialTLSContext.
func dialTLS(dial dialFunc, cfg *tls.Config) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, &DialError{Addr: addr, Err: err}
		}
		raw, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c := cfg.Clone()
		c.ServerName = host
		tc := tls.Client(raw, c)
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		err = tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			raw.Close()
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				return nil, err // the context ended it, not the upstream's TLS
			}
			return nil, &TLSHandshakeError{Addr: addr, Err: err}
		}
		return tc, nil
	}
}

// Audit reasons of an upstream failure.
const (
	reasonUpstreamTLS         = "upstream TLS failed"
	reasonUpstreamTimeout     = "upstream timeout"
	reasonUpstreamUnreachable = "upstream unreachable"
	reasonClientGone          = "client gone"
	reasonUpstreamError       = "upstream error"
)

// classifyUpstream names a dial, TLS or exchange error by its type: the
// audit reason and a phrase for the message. In order:
//
//   - a certificate that did not verify (crypto/tls's
//     *CertificateVerificationError, or the x509 error itself);
//   - any other TLS failure: a *TLSHandshakeError, a record that is not
//     TLS (tls.RecordHeaderError), an alert (tls.AlertError, or the
//     *net.OpError crypto/tls reports a sent or received alert in after
//     the handshake, Op "local error" or "remote error");
//   - a timeout (context.DeadlineExceeded, a net.Error that says so);
//   - a failed dial (*DialError, a *net.OpError with Op "dial");
//   - a cancelled request (context.Canceled): the client went away.
func classifyUpstream(err error) (reason, what string) {
	var (
		verifyErr *tls.CertificateVerificationError
		unknownCA x509.UnknownAuthorityError
		hostErr   x509.HostnameError
		invalid   x509.CertificateInvalidError
		handshake *TLSHandshakeError
		recordErr tls.RecordHeaderError
		alert     tls.AlertError
		dialErr   *DialError
		opErr     *net.OpError
		netErr    net.Error
	)
	switch {
	case errors.As(err, &verifyErr), errors.As(err, &unknownCA), errors.As(err, &hostErr), errors.As(err, &invalid):
		return reasonUpstreamTLS, "TLS verification failed"
	case errors.As(err, &handshake), errors.As(err, &recordErr), errors.As(err, &alert),
		errors.As(err, &opErr) && (opErr.Op == "local error" || opErr.Op == "remote error"):
		return reasonUpstreamTLS, "TLS handshake failed"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return reasonUpstreamTimeout, "timed out"
	case errors.As(err, &dialErr), errors.As(err, &opErr) && opErr.Op == "dial":
		return reasonUpstreamUnreachable, "unreachable"
	case errors.Is(err, context.Canceled):
		return reasonClientGone, "request cancelled"
	}
	return reasonUpstreamError, "failed"
}
