package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// The audit reasons and metric kinds are an interface (deploy/monitoring
// and log searches use them): this pins every one, so that rewording one
// is a deliberate change to this table too.
func TestFailKindsPinned(t *testing.T) {
	want := map[failKind]failInfo{
		failInternal:     {"internal error", "internal", true},
		failBadStartup:   {"bad startup", "bad_startup", false},
		failTooMany:      {"too many clients", "too_many_clients", false},
		failCredential:   {"credential unavailable", "credential_unavailable", true},
		failUnreachable:  {"upstream unreachable", "upstream_unreachable", true},
		failTimeout:      {"upstream timeout", "upstream_timeout", true},
		failTLS:          {"upstream TLS failed", "upstream_tls", true},
		failAuth:         {"upstream auth failed", "upstream_auth", true},
		failRefused:      {"upstream error", "upstream_error", true},
		failProtocol:     {"upstream protocol error", "upstream_protocol", true},
		failShutdown:     {"shutdown", "shutdown", false},
		failReplication:  {"replication not allowed", "replication_refused", true},
		failClientTLS:    {"client TLS required", "client_tls_required", false},
		failUnattributed: {"unattributed", "unattributed", true},
		failPeerMismatch: {"peer mismatch", "peer_mismatch", true},
		failNotAllowed:   {"workload not allowed", "workload_not_allowed", true},
	}
	if len(want) != len(failInfos) {
		t.Fatalf("%d kinds, %d pinned: pin the new ones here", len(failInfos), len(want))
	}
	for k, w := range want {
		if got := k.info(); got != w {
			t.Errorf("kind %d = %+v, want %+v", k, got, w)
		}
	}
	if failKind(200).info() != failInfos[failInternal] {
		t.Errorf("an unknown kind is not internal")
	}
}

// rewordAll returns a copy of err (an *upstreamError, possibly wrapped)
// with every message it carries replaced: what an edit to the wording, a
// translated upstream or a different Go version's error text would do.
func reworded(err error) error {
	var ue *upstreamError
	if !errors.As(err, &ue) {
		return errors.New("something else entirely")
	}
	c := *ue
	c.msg = "a message nobody would match on"
	if c.err != nil {
		c.err = errors.New("a cause reworded")
	}
	if c.resp != nil {
		r := *c.resp
		r.Message = "eine ganz andere Meldung"
		c.resp = &r
	}
	return &c
}

// Retries, SQLSTATEs, audit reasons and metric kinds are decided by the
// error's kind, never by its text: every error the handshake builds makes
// the same decisions with its messages reworded.
func TestDecisionsIgnoreMessageText(t *testing.T) {
	h, err := NewHandler(Options{Service: testService("db.internal:5432")})
	if err != nil {
		t.Fatal(err)
	}
	pw := credentials.NewSecret(testPassword)
	expired, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	tests := []struct {
		name  string
		err   error
		kind  failKind
		code  string
		retry bool
	}{
		{"unreachable", newUpstreamError(failUnreachable, codeUnableToConnect, "upstream x unreachable", io.EOF), failUnreachable, "08001", false},
		{"protocol", h.protoError("read", io.ErrUnexpectedEOF), failProtocol, "08001", false},
		{"TLS", h.tlsError(context.Background(), errors.New("x509: unknown authority")), failTLS, "08001", false},
		{"TLS timeout", h.tlsError(context.Background(), os.ErrDeadlineExceeded), failTimeout, "08001", false},
		{"login timeout", h.handshakeTimeout(expired, fmt.Errorf("read: %w", net.ErrClosed), "login"), failTimeout, "08001", false},
		{"auth", h.upstreamRejected(authFailed(testUser), pw), failAuth, "28P01", true},
		{"auth, other wording", h.upstreamRejected(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01",
			Message: "Passwort-Authentifizierung für Benutzer »dbuser« fehlgeschlagen"}, pw), failAuth, "28P01", true},
		{"refused", h.upstreamRejected(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "53300", Message: "sorry, too many clients already"}, pw), failRefused, "53300", false},
		{"shutdown", errShutdownHandshake(), failShutdown, "57P01", false},
		{"wrapped", fmt.Errorf("login: %w", h.protoError("read", io.EOF)), failProtocol, "08001", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, err := range []error{tc.err, reworded(tc.err)} {
				resp, kind := clientError(err)
				if kind != tc.kind || kindOf(err) != tc.kind {
					t.Errorf("%q: kind %d (kindOf %d), want %d", err, kind, kindOf(err), tc.kind)
				}
				if resp.Code != tc.code || resp.Severity != "FATAL" {
					t.Errorf("%q: %s %s, want FATAL %s", err, resp.Severity, resp.Code, tc.code)
				}
				if kindOf(err).freshCredentialMayHelp() != tc.retry {
					t.Errorf("%q: retry with a fresh credential = %v, want %v", err, !tc.retry, tc.retry)
				}
			}
		})
	}
}

// What the upstream says is scrubbed of the password when the error is
// built, wherever it ends up (client, log, audit).
func TestUpstreamErrorScrubbed(t *testing.T) {
	h, err := NewHandler(Options{Service: testService("db.internal:5432")})
	if err != nil {
		t.Fatal(err)
	}
	pw := credentials.NewSecret(testPassword)
	for _, m := range []*pgproto3.ErrorResponse{
		{Severity: "FATAL", Code: "28P01", Message: "password " + testPassword + " is wrong"},
		{Severity: "FATAL", Code: "3D000", Message: "no database " + testPassword, Detail: testPassword, Hint: "try " + testPassword},
	} {
		err := h.upstreamRejected(m, pw)
		resp, _ := clientError(err)
		all := err.Error() + resp.Message + resp.Detail + resp.Hint
		if strings.Contains(all, testPassword) {
			t.Errorf("the password survives: %q / %+v", err, resp)
		}
		if !strings.Contains(all, "REDACTED") {
			t.Errorf("no REDACTED in %q", all)
		}
	}
}

// silentUpstream accepts connections and never sends a byte, until the
// test ends: what the upstream looks like to credproxy when the server is
// wedged (or a load balancer accepts for a dead backend).
func silentUpstream(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// Issue 13 item 8: against an upstream that accepts TCP and never
// answers, the handshake timeout is reported one way every time — the
// "upstream timeout" kind, 08001, the same message — whichever of the
// connection deadline and the context notices first, and at whichever
// step (the StartupMessage's answer, or the SSLRequest's).
func TestHandshakeTimeoutClassifiedOnce(t *testing.T) {
	const runs = 12
	for _, mode := range []string{"disable", "require"} {
		t.Run(mode, func(t *testing.T) {
			m := proxy.NewMetrics()
			svc := testService(silentUpstream(t))
			svc.TLS = config.PostgresTLS{Mode: mode}
			// Long enough that a loopback dial completes on a loaded machine (a
			// dial past it is "upstream unreachable", another kind), short
			// enough to keep the test quick.
			svc.ConnectTimeout = config.Duration(500 * time.Millisecond)
			p := startProxy(t, svc, withMetrics(m))
			var wg sync.WaitGroup
			msgs := make(chan string, runs)
			for range runs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c := dialProxy(t, p.addr)
					c.write(encodeStartup(protocol30, map[string]string{"user": "appuser"}))
					resp := c.readError()
					if resp == nil {
						t.Errorf("no ErrorResponse")
						return
					}
					msgs <- resp.Code + " " + resp.Message
				}()
			}
			wg.Wait()
			close(msgs)
			for range runs {
				_ = p.wait(t)
			}
			want := fmt.Sprintf("08001 credproxy: upstream %s did not complete the", svc.Upstream)
			for msg := range msgs {
				if !strings.HasPrefix(msg, want) {
					t.Errorf("the app was told %q, want %q…", msg, want)
				}
			}
			for _, d := range p.audit.find(audit.EventDenied) {
				if d.Reason != "upstream timeout" {
					t.Errorf("audited as %q: %s", d.Reason, deref(d.Error))
				}
			}
			if n := metricValue(t, m, "credproxy_auth_failures_total", map[string]string{"kind": KindUpstreamTimeout}); n != runs {
				t.Errorf("auth_failures_total{kind=upstream_timeout} = %v, want %d", n, runs)
			}
		})
	}
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

// handshakeTimeout decides on the cause, not on which timer fired first:
// a deadline error is a timeout even before ctx has noticed; a closed
// connection is one only when ctx closed it; any other error stays what
// it was even when ctx has ended since.
func TestHandshakeTimeoutCause(t *testing.T) {
	h, err := NewHandler(Options{Service: testService("db.internal:5432")})
	if err != nil {
		t.Fatal(err)
	}
	live := context.Background()
	expired, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	stopped, stop := context.WithCancel(context.Background())
	stop()
	authErr := h.upstreamRejected(authFailed(testUser), credentials.NewSecret(testPassword))
	tests := []struct {
		name string
		ctx  context.Context
		err  error
		want failKind // failInternal: nil, err stands
	}{
		{"conn deadline first", live, h.protoError("read", &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}), failTimeout},
		{"ctx first", expired, h.protoError("read", &net.OpError{Op: "read", Err: net.ErrClosed}), failTimeout},
		{"tls ctx error", live, context.DeadlineExceeded, failTimeout},
		{"succeeded, ctx ended just after", expired, nil, failTimeout},
		{"auth failure, ctx ended since", expired, authErr, failInternal},
		{"closed by the upstream", live, h.protoError("read", io.ErrUnexpectedEOF), failInternal},
		{"shutdown", stopped, h.protoError("read", net.ErrClosed), failShutdown},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := h.handshakeTimeout(tc.ctx, tc.err, "login")
			switch {
			case tc.want == failInternal && got != nil:
				t.Errorf("got %v, want the error to stand", got)
			case tc.want != failInternal && kindOf(got) != tc.want:
				t.Errorf("got %v (kind %d), want kind %d", got, kindOf(got), tc.want)
			}
		})
	}
}
