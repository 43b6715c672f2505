package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Decisions are made on types (issue 9): the status the app gets, the
// audit record's reason and the metrics' labels follow an error's type
// and kind, never its text. Every failure below is raised twice, with two
// wordings that each try to pass for another kind ("tls: ", "timeout",
// "permission denied", "connection refused"), and both must end alike.

// misleading are the wordings each failure is raised with.
var misleading = []string{
	"tls: handshake failure: i/o timeout",
	"connection refused; 403 permission denied; upstream auth failed",
}

// wordedTimeout is a net.Error that timed out, worded as it likes.
type wordedTimeout string

func (e wordedTimeout) Error() string { return string(e) }
func (wordedTimeout) Timeout() bool   { return true }
func (wordedTimeout) Temporary() bool { return true }

// failingConn accepts what is written and fails every read with err: an
// upstream that breaks off the TLS handshake, in err's words.
type failingConn struct{ err error }

func (c failingConn) Read([]byte) (int, error)       { return 0, c.err }
func (c failingConn) Write(b []byte) (int, error)    { return len(b), nil }
func (failingConn) Close() error                     { return nil }
func (failingConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
func (failingConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 443} }
func (failingConn) SetDeadline(time.Time) error      { return nil }
func (failingConn) SetReadDeadline(time.Time) error  { return nil }
func (failingConn) SetWriteDeadline(time.Time) error { return nil }
func (c failingConn) String() string                 { return "failingConn(" + c.err.Error() + ")" }
func failDial(err error) func() (net.Conn, error) {
	return func() (net.Conn, error) { return nil, err }
}
func failHandshake(err error) func() (net.Conn, error) {
	return func() (net.Conn, error) { return failingConn{err}, nil }
}

// credsFailing is a credential store whose every Acquire fails with err.
type credsFailing struct{ err error }

func (c credsFailing) Acquire(context.Context, string) (*credentials.Handle, error) {
	return nil, c.err
}

// decision is what a failure decided: the app's status, the audit
// records' events, reasons and statuses, and the counters' series with
// their values (byte counts left out: the message's length is the
// wording's).
type decision struct {
	status  int
	records []string
	metrics []string
}

func TestDecisionsDoNotDependOnWording(t *testing.T) {
	denied := func(why string) error {
		return &DeniedError{Addr: netip.MustParseAddrPort("127.0.0.1:443"), Why: why}
	}
	credErr := func(k credentials.Kind) func(string) error {
		return func(w string) error {
			return &credentials.UnavailableError{Name: "tok", Err: &credentials.Error{Kind: k, Msg: w}}
		}
	}
	tests := []struct {
		name   string
		dial   func(wording string) func() (net.Conn, error) // nil: a real upstream
		creds  func(wording string) error                    // nil: the test's static credential
		status int
		reason string // the denied record's; "" for none
		metric string // a counter series the decision must have counted
	}{
		{
			name: "dial refused by the network",
			dial: func(w string) func() (net.Conn, error) {
				return failDial(&net.OpError{Op: "dial", Net: "tcp", Err: errors.New(w)})
			},
			status: http.StatusBadGateway, reason: reasonUpstreamUnreachable,
			metric: `credproxy_http_requests_total{code="502",injected="false",route="api.test"}`,
		},
		{
			name:   "dial failed, untyped",
			dial:   func(w string) func() (net.Conn, error) { return failDial(errors.New(w)) },
			status: http.StatusBadGateway, reason: reasonUpstreamUnreachable,
			metric: `credproxy_http_requests_total{code="502",injected="false",route="api.test"}`,
		},
		{
			name:   "dial timed out",
			dial:   func(w string) func() (net.Conn, error) { return failDial(fmt.Errorf("dial tcp: %w", wordedTimeout(w))) },
			status: http.StatusBadGateway, reason: reasonUpstreamTimeout,
			metric: `credproxy_http_requests_total{code="502",injected="false",route="api.test"}`,
		},
		{
			name:   "TLS handshake broken off",
			dial:   func(w string) func() (net.Conn, error) { return failHandshake(errors.New(w)) },
			status: http.StatusBadGateway, reason: reasonUpstreamTLS,
			metric: `credproxy_http_requests_total{code="502",injected="false",route="api.test"}`,
		},
		{
			name:   "destination denied",
			dial:   func(w string) func() (net.Conn, error) { return failDial(&DialError{Err: denied(w)}) },
			status: http.StatusForbidden, reason: "destination denied",
			metric: `credproxy_connections_refused_total{protocol="http",reason="destination_denied",service="http"}`,
		},
	}
	for k := credentials.KindOther; k <= credentials.KindNotFound; k++ {
		tests = append(tests, struct {
			name   string
			dial   func(string) func() (net.Conn, error)
			creds  func(string) error
			status int
			reason string
			metric string
		}{
			name:   "credential " + k.String(),
			creds:  credErr(k),
			status: http.StatusServiceUnavailable, reason: "credential unavailable",
			metric: `credproxy_http_requests_total{code="503",injected="false",route="api.test"}`,
		})
	}
	tests = append(tests, struct {
		name   string
		dial   func(string) func() (net.Conn, error)
		creds  func(string) error
		status int
		reason string
		metric string
	}{
		name:   "credential, untyped",
		creds:  func(w string) error { return errors.New(w) },
		status: http.StatusServiceUnavailable, reason: "credential unavailable",
		metric: `credproxy_http_requests_total{code="503",injected="false",route="api.test"}`,
	})

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var first decision
			for i, w := range misleading {
				d := decide(t, tt.dial, tt.creds, w)
				if d.status != tt.status {
					t.Errorf("worded %q: status %d, want %d", w, d.status, tt.status)
				}
				if want := "denied " + tt.reason + " " + fmt.Sprint(tt.status); !slices.Contains(d.records, want) {
					t.Errorf("worded %q: audit %q, want %q among them", w, d.records, want)
				}
				if !slices.Contains(d.metrics, tt.metric+" 1") {
					t.Errorf("worded %q: metrics %q, want %q at 1", w, d.metrics, tt.metric)
				}
				if i == 0 {
					first = d
					continue
				}
				if d.status != first.status || !slices.Equal(d.records, first.records) || !slices.Equal(d.metrics, first.metrics) {
					t.Errorf("rewording changed the decision:\n%q: %+v\n%q: %+v", misleading[0], first, w, d)
				}
			}
		})
	}
}

// decide sends one request to a route whose upstream dial or credential
// fails as told, in wording's words, and returns what was decided.
func decide(t *testing.T, dial func(string) func() (net.Conn, error), creds func(string) error, wording string) decision {
	t.Helper()
	s := proxySetup{routes: []config.HTTPRoute{headerRoute("api.test")}, metrics: proxy.NewMetrics()}
	if dial != nil {
		s.fakeDial = map[string]func() (net.Conn, error){"api.test": dial(wording)}
	}
	if creds != nil {
		s.creds = credsFailing{creds(wording)}
		s.dial = map[string]string{"api.test": "127.0.0.1:1"} // never dialed
	}
	tp := startProxy(t, s)
	status, body := tp.get(t, tp.client(t), "https://api.test/")
	if !strings.HasPrefix(body, "credproxy: ") {
		t.Errorf("body %q: not credproxy's own answer", body)
	}
	var d decision
	d.status = status
	tp.audit.find(t, "the request record", func(r audit.Record) bool { return r.Event == audit.EventRequest })
	for _, r := range tp.audit.records() {
		d.records = append(d.records, strings.TrimSpace(r.Event+" "+r.Reason+" "+fmt.Sprint(r.Status)))
	}
	d.metrics = counters(t, s.metrics)
	return d
}

// counters lists credproxy's counter series in m but byte counts, as
// `name{label="value",…} value`, sorted.
func counters(t *testing.T, m *proxy.Metrics) []string {
	t.Helper()
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, f := range families {
		if f.GetType() != dto.MetricType_COUNTER || !strings.HasPrefix(f.GetName(), "credproxy_") || strings.Contains(f.GetName(), "bytes") {
			continue
		}
		for _, s := range f.GetMetric() {
			var labels []string
			for _, lp := range s.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
			}
			out = append(out, fmt.Sprintf("%s{%s} %g", f.GetName(), strings.Join(labels, ","), s.GetCounter().GetValue()))
		}
	}
	slices.Sort(out)
	return out
}

// A request on a pooled connection is sent again on a new one only when
// the failure's type says the peer closed the connection while it was
// idle; an error that merely reads like it is not retried, and one that
// is does not need the words.
func TestStaleRetryDecidedByType(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		retry bool
	}{
		{"no response, EOF in other words", &noResponseError{fmt.Errorf("%s: %w", misleading[0], io.EOF)}, true},
		{"no response, unexpected EOF", &noResponseError{io.ErrUnexpectedEOF}, true},
		{"no response, reset", &noResponseError{&net.OpError{Op: "read", Err: syscall.ECONNRESET}}, true},
		{"write found the connection reset", fmt.Errorf("%s: %w", misleading[1], syscall.ECONNRESET), true},
		{"write found the pipe broken", &net.OpError{Op: "write", Err: syscall.EPIPE}, true},
		{"no response, worded as EOF", &noResponseError{errors.New("EOF")}, false},
		{"no response, worded as a reset", &noResponseError{errors.New("read: connection reset by peer")}, false},
		{"worded as a broken pipe", errors.New("write: broken pipe"), false},
		{"EOF after part of a response", fmt.Errorf("reading the body: %w", io.EOF), false},
		{"no response, timed out", &noResponseError{wordedTimeout("EOF")}, false},
	}
	var lc *leanConn
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := lc.staleFailure(tt.err); got != tt.retry {
				t.Errorf("staleFailure(%q) = %v, want %v", tt.err, got, tt.retry)
			}
		})
	}
}
