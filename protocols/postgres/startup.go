package postgres

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"go.uber.org/zap"
)

// startupError is a problem with what the app sent before authentication.
type startupError struct {
	kind failKind // failBadStartup unless set
	code string
	msg  string
	err  error
}

func (e *startupError) Error() string {
	if e.err != nil {
		return e.msg + ": " + e.err.Error()
	}
	return e.msg
}

func (e *startupError) Unwrap() error { return e.err }

// failKind is the error's kind: bad startup unless it says otherwise.
func (e *startupError) failKind() failKind {
	if e.kind == failInternal {
		return failBadStartup
	}
	return e.kind
}

// readStartup reads packets until a StartupMessage, answering SSLRequest and
// GSSENCRequest on the way and serving a CancelRequest. It returns the
// parameters to send upstream and any bytes owed to the app before the
// handover (NegotiateProtocolVersion). params is nil when the connection is
// done (a cancel request, or an error already handled).
func (s *session) readStartup(ctx context.Context) (params map[string]string, out []byte, err error) {
	h := s.h
	tlsDone, sslAnswered := false, false
	for {
		p, err := readStartupPacket(s.rd)
		if err != nil {
			if errors.Is(err, io.EOF) && !sslAnswered {
				// Probes (load balancers, port scans) connect and close.
				s.log.Debug("connection closed before startup")
				return nil, nil, nil
			}
			return nil, nil, s.startupFailed(err)
		}
		switch p.code {
		case sslRequestCode:
			if tlsDone || s.rd.Buffered() > 0 {
				// Bytes after SSLRequest would be read as plaintext from
				// before the handshake: refuse them (CVE-2021-23214).
				return nil, nil, s.deny(&startupError{code: codeProtocolViolation, msg: "unexpected data after SSLRequest"}, nil)
			}
			sslAnswered = true
			if h.clientTLS == nil {
				if _, err := s.raw.Write([]byte{'N'}); err != nil {
					return nil, nil, s.startupFailed(err)
				}
				continue
			}
			if _, err := s.raw.Write([]byte{'S'}); err != nil {
				return nil, nil, s.startupFailed(err)
			}
			tc := tls.Server(s.client, h.clientTLS)
			if err := tc.HandshakeContext(ctx); err != nil {
				return nil, nil, s.startupFailed(fmt.Errorf("client TLS handshake: %w", err))
			}
			s.raw, s.rd, tlsDone = tc, bufio.NewReaderSize(tc, 1024), true
		case gssEncRequestCode:
			if _, err := s.raw.Write([]byte{'N'}); err != nil {
				return nil, nil, s.startupFailed(err)
			}
		case cancelRequestCode:
			return nil, nil, s.serveCancel(ctx, p)
		default:
			if p.major() != 3 {
				return nil, nil, s.deny(&startupError{code: codeFeatureNotSupported,
					msg: fmt.Sprintf("unsupported frontend protocol %d.%d: credproxy supports 3.0", p.major(), p.minor())}, nil)
			}
			params, unrecognized := splitProtocolOptions(p.params)
			if p.minor() > 0 || len(unrecognized) > 0 {
				out = appendNegotiateProtocolVersion(out, protocol30, unrecognized)
			}
			s.database = s.chooseDatabase(params)
			delete(params, "password")
			if h.cfg.ClientTLS != nil && h.cfg.ClientTLS.Required && !tlsDone {
				// As PostgreSQL refuses a plaintext connection that only a
				// hostssl line of pg_hba.conf would admit.
				return nil, nil, s.deny(&startupError{kind: failClientTLS, code: codeInvalidAuthorization,
					msg: fmt.Sprintf("no encryption: service %q requires TLS from the app (client_tls.required); connect with sslmode=require or stricter", h.cfg.Name)}, nil)
			}
			s.replication = replicationMode(params["replication"])
			if s.replication != "" && !h.cfg.AllowReplication {
				// As PostgreSQL refuses a walsender to a role without
				// REPLICATION.
				return nil, nil, s.deny(&startupError{kind: failReplication, code: codeInsufficientPrivilege,
					msg: fmt.Sprintf("replication connection refused: service %q does not set allow_replication", h.cfg.Name)}, nil)
			}
			return params, out, nil
		}
	}
}

// replicationMode reads the replication startup parameter as PostgreSQL
// does: "physical" for true/on/yes/1 (a walsender for physical streaming,
// pg_basebackup), "logical" for database (logical decoding), "" for
// false/off/no/0 or absent. A value PostgreSQL would reject counts as a
// replication request, so that it is refused unless allowed.
func replicationMode(v string) string {
	switch strings.ToLower(v) {
	case "", "false", "off", "no", "0":
		return ""
	case "database":
		return "logical"
	case "true", "on", "yes", "1":
		return "physical"
	}
	return "invalid"
}

// chooseDatabase applies the service's pinned database; otherwise the app's
// choice, defaulting (as PostgreSQL does) to the user name the app gave.
func (s *session) chooseDatabase(params map[string]string) string {
	if s.h.cfg.Database != "" {
		return s.h.cfg.Database
	}
	if db := params["database"]; db != "" {
		return db
	}
	return params["user"]
}

// startupFailed handles a broken or stalled startup: the app gets a FATAL
// when it can still read one, and the refusal is audited and logged.
func (s *session) startupFailed(err error) error {
	code, msg := codeProtocolViolation, "invalid startup packet"
	var ne net.Error
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		msg = fmt.Sprintf("no startup packet within %s", s.h.cfg.StartupTimeout.D())
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		msg = "connection closed during startup"
	}
	return s.deny(&startupError{code: code, msg: msg, err: err}, nil)
}

// serveCancel forwards a CancelRequest that carries a key this proxy issued.
// Nothing is ever sent back, as PostgreSQL sends nothing.
func (s *session) serveCancel(ctx context.Context, p *startupPacket) error {
	cr, err := decodeCancel(p)
	if err != nil {
		s.log.Debug("malformed cancel request dropped")
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, s.h.cfg.ConnectTimeout.D())
	defer cancel()
	sent, err := s.h.cancels.forward(cctx, cr.ProcessID, cr.SecretKey)
	switch {
	case err != nil:
		s.log.Warn("cancel request not delivered", zap.Error(err))
	case sent:
		s.log.Info("cancel request forwarded")
	default:
		s.log.Debug("cancel request with unknown key dropped")
	}
	return nil
}
