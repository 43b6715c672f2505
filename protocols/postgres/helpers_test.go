package postgres

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// The injected credential. testPassword must never reach a client, a log
// or the audit log; every proxy started by startProxy checks that at cleanup.
const (
	testUser     = "dbuser"
	testPassword = "s3cr3t-Pa55word"

	upstreamPID    = 4242
	upstreamSecret = 0xdeadbeef

	ioTimeout = 15 * time.Second
)

// upstreamParams are the ParameterStatus messages the fake upstream sends.
var upstreamParams = []pgproto3.ParameterStatus{
	{Name: "server_version", Value: "16.2"},
	{Name: "server_encoding", Value: "UTF8"},
	{Name: "client_encoding", Value: "UTF8"},
	{Name: "DateStyle", Value: "ISO, MDY"},
	{Name: "integer_datetimes", Value: "on"},
	{Name: "standard_conforming_strings", Value: "on"},
	{Name: "TimeZone", Value: "UTC"},
}

// ---- fake upstream ----

// fakeUpstream is a scripted PostgreSQL backend on 127.0.0.1:0. Each
// connection's startup packet is recorded; a StartupMessage runs script, a
// CancelRequest is recorded and the connection closed, as PostgreSQL does.
type fakeUpstream struct {
	t      *testing.T
	ln     net.Listener
	addr   string
	script func(u *upConn)

	mu       sync.Mutex
	startups []map[string]string
	cancels  []pgproto3.CancelRequest
	conns    []net.Conn
	wg       sync.WaitGroup

	cancelCh chan pgproto3.CancelRequest
}

// upConn is one connection to the fake upstream, after its StartupMessage.
type upConn struct {
	t      *testing.T
	conn   net.Conn
	be     *pgproto3.Backend
	params map[string]string
}

func startUpstream(t *testing.T, script func(u *upConn)) *fakeUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	f := &fakeUpstream{t: t, ln: ln, addr: ln.Addr().String(), script: script,
		cancelCh: make(chan pgproto3.CancelRequest, 16)}
	f.wg.Add(1)
	go f.accept()
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeUpstream) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.conns = append(f.conns, c)
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer c.Close()
			f.serve(c)
		}()
	}
}

func (f *fakeUpstream) serve(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	be := pgproto3.NewBackend(pgproto3.NewChunkReader(c), c)
	msg, err := be.ReceiveStartupMessage()
	if err != nil {
		// The proxy may close a connection before it sends anything (a
		// shutdown during its dial), and the test's cleanup closes what is
		// left: neither is a broken startup.
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
			f.t.Errorf("fake upstream: read startup: %v", err)
		}
		return
	}
	switch m := msg.(type) {
	case *pgproto3.CancelRequest:
		f.mu.Lock()
		f.cancels = append(f.cancels, *m)
		f.mu.Unlock()
		f.cancelCh <- *m
	case *pgproto3.StartupMessage:
		params := make(map[string]string, len(m.Parameters))
		for k, v := range m.Parameters {
			params[k] = v
		}
		f.mu.Lock()
		f.startups = append(f.startups, params)
		f.mu.Unlock()
		if f.script != nil {
			f.script(&upConn{t: f.t, conn: c, be: be, params: params})
		}
	default:
		f.t.Errorf("fake upstream: unexpected first message %T", msg)
	}
}

// startupParams returns the i-th StartupMessage's parameters.
func (f *fakeUpstream) startupParams(t *testing.T, i int) map[string]string {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if i >= len(f.startups) {
		t.Fatalf("fake upstream got %d startup messages, want at least %d", len(f.startups), i+1)
	}
	return f.startups[i]
}

// connCount is how many connections the fake upstream accepted.
func (f *fakeUpstream) connCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.conns)
}

// send sends messages, reporting failure; it returns false on error.
func (u *upConn) send(msgs ...pgproto3.BackendMessage) bool {
	var buf []byte
	for _, m := range msgs {
		var err error
		if buf, err = m.Encode(buf); err != nil {
			u.t.Errorf("fake upstream: encode %T: %v", m, err)
			return false
		}
	}
	if _, err := u.conn.Write(buf); err != nil {
		u.t.Errorf("fake upstream: send: %v", err)
		return false
	}
	return true
}

// receive reads one message; io errors end the script quietly (the proxy
// may close the connection), so it returns nil then.
func (u *upConn) receive() (msg pgproto3.FrontendMessage) {
	// pgproto3/v2's decoders panic on some malformed messages (an empty
	// Query): a real server would drop the connection, and so does this one.
	defer func() {
		if recover() != nil {
			msg = nil
		}
	}()
	m, err := u.be.Receive()
	if err != nil {
		return nil
	}
	return m
}

// ready finishes a handshake: AuthenticationOk (unless authOK is false
// because the caller sent it), ParameterStatus, optional BackendKeyData and
// ReadyForQuery.
func (u *upConn) ready(withKey bool) bool {
	msgs := []pgproto3.BackendMessage{&pgproto3.AuthenticationOk{}}
	for i := range upstreamParams {
		msgs = append(msgs, &upstreamParams[i])
	}
	if withKey {
		msgs = append(msgs, &pgproto3.BackendKeyData{ProcessID: upstreamPID, SecretKey: upstreamSecret})
	}
	msgs = append(msgs, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	return u.send(msgs...)
}

// serve answers simple and extended queries until Terminate or EOF. Each
// message received is passed to seen, if not nil.
func (u *upConn) serve(seen func(m pgproto3.FrontendMessage)) {
	for {
		m := u.receive()
		if m == nil {
			return
		}
		if seen != nil {
			seen(m)
		}
		switch m.(type) {
		case *pgproto3.Query:
			u.send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
		case *pgproto3.Parse:
			u.send(&pgproto3.ParseComplete{})
		case *pgproto3.Bind:
			u.send(&pgproto3.BindComplete{})
		case *pgproto3.Describe:
			u.send(&pgproto3.NoData{})
		case *pgproto3.Execute:
			u.send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 0")})
		case *pgproto3.Sync:
			u.send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case *pgproto3.Terminate:
			return
		}
	}
}

// trustScript logs in without a password and serves queries.
func trustScript(withKey bool) func(u *upConn) {
	return func(u *upConn) {
		if u.ready(withKey) {
			u.serve(nil)
		}
	}
}

// ---- proxy under test ----

// auditRecorder is an audit.Sink that keeps copies of the records.
type auditRecorder struct {
	mu   sync.Mutex
	recs []audit.Record
}

func (r *auditRecorder) Record(rec *audit.Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, *rec)
}

func (r *auditRecorder) all() []audit.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Record(nil), r.recs...)
}

// find returns the records of one event.
func (r *auditRecorder) find(event string) []audit.Record {
	var out []audit.Record
	for _, rec := range r.all() {
		if rec.Event == event {
			out = append(out, rec)
		}
	}
	return out
}

// wait waits up to limit for a record of event and returns the first.
func (r *auditRecorder) wait(t *testing.T, event string, limit time.Duration) audit.Record {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if recs := r.find(event); len(recs) > 0 {
			return recs[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s record within %v; have %v", event, limit, r.events())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *auditRecorder) events() []string {
	var out []string
	for _, rec := range r.all() {
		out = append(out, rec.Event)
	}
	return out
}

// testProxy is a Handler served on 127.0.0.1:0 by an accept loop.
type testProxy struct {
	addr    string
	h       *Handler
	audit   *auditRecorder
	logs    *observer.ObservedLogs
	cancels *CancelRegistry
	results chan error
}

type proxyOption func(o *Options)

func withAuditQueries(o *Options) { o.AuditQueries = true }

func withCredentials(c proxy.Credentials) proxyOption {
	return func(o *Options) { o.Credentials = c }
}

func withCancels(r *CancelRegistry) proxyOption {
	return func(o *Options) { o.Cancels = r }
}

func withMetrics(m *proxy.Metrics) proxyOption {
	return func(o *Options) { o.Metrics = m }
}

// metricValue reads the series of metric name whose labels include
// labels from m's registry: a counter's or a gauge's value, a histogram's
// sample count; 0 when there is no such series.
func metricValue(t *testing.T, m *proxy.Metrics, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, s := range f.GetMetric() {
			have := map[string]string{}
			for _, lp := range s.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue series
				}
			}
			switch {
			case s.GetCounter() != nil:
				return s.GetCounter().GetValue()
			case s.GetGauge() != nil:
				return s.GetGauge().GetValue()
			case s.GetHistogram() != nil:
				return float64(s.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

// testService is the config of a proxied service in front of upstream.
func testService(upstream string) config.Postgres {
	return config.Postgres{
		Name:        "appdb",
		Upstream:    upstream,
		Credentials: "c",
		TLS:         config.PostgresTLS{Mode: "disable"},
	}
}

// staticStore serves fields under the name "c".
func staticStore(t *testing.T, fields map[string]string) *credentials.Store {
	t.Helper()
	src, err := credentials.NewStatic(fields)
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	return newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
}

// newStore builds a credential Store that is closed when the test ends.
func newStore(t *testing.T, sources map[string]credentials.Source, opts credentials.Options) *credentials.Store {
	t.Helper()
	s := credentials.NewStore(sources, opts)
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

func defaultStore(t *testing.T) *credentials.Store {
	t.Helper()
	return staticStore(t, map[string]string{"username": testUser, "password": testPassword})
}

func startProxy(t *testing.T, svc config.Postgres, opts ...proxyOption) *testProxy {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	rec := &auditRecorder{}
	o := Options{
		Service:     svc,
		Credentials: defaultStore(t),
		Audit:       rec,
		Cancels:     NewCancelRegistry(),
		Logger:      zap.New(core).Named("postgres"),
	}
	for _, opt := range opts {
		opt(&o)
	}
	h, err := NewHandler(o)
	if err != nil {
		t.Fatalf("NewHandler: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	p := &testProxy{addr: ln.Addr().String(), h: h, audit: rec, logs: logs, cancels: o.Cancels,
		results: make(chan error, 64)}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.results <- h.ServeConn(ctx, conn, "test-session")
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		wg.Wait()
		p.checkNoSecrets(t)
	})
	return p
}

// wait returns the next session's ServeConn result.
func (p *testProxy) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-p.results:
		return err
	case <-time.After(ioTimeout):
		t.Fatalf("ServeConn did not return within %s", ioTimeout)
		return nil
	}
}

// checkNoSecrets fails if the password appears in any log entry or audit record.
func (p *testProxy) checkNoSecrets(t *testing.T) {
	t.Helper()
	for _, e := range p.logs.All() {
		line := fmt.Sprintf("%s %s %v", e.LoggerName, e.Message, e.ContextMap())
		if strings.Contains(line, testPassword) {
			t.Errorf("log entry shows the password: %s", line)
		}
	}
	for _, rec := range p.audit.all() {
		b, err := json.Marshal(rec)
		if err != nil {
			t.Errorf("marshal audit record: %v", err)
			continue
		}
		if strings.Contains(string(b), testPassword) {
			t.Errorf("audit record shows the password: %s", b)
		}
	}
}

// ---- client side ----

// testClient speaks raw protocol to the proxy, so that it can send what a
// real client would not and read what pgproto3/v2 cannot decode ('v').
type testClient struct {
	t    *testing.T
	conn net.Conn
	rd   *bufio.Reader
}

func dialProxy(t *testing.T, addr string) *testClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	t.Cleanup(func() { conn.Close() })
	return &testClient{t: t, conn: conn, rd: bufio.NewReader(conn)}
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *testClient) send(msgs ...pgproto3.FrontendMessage) {
	c.t.Helper()
	c.write(encodeFrontend(c.t, msgs...))
}

func encodeFrontend(t *testing.T, msgs ...pgproto3.FrontendMessage) []byte {
	t.Helper()
	var buf []byte
	for _, m := range msgs {
		var err error
		if buf, err = m.Encode(buf); err != nil {
			t.Fatalf("encode %T: %v", m, err)
		}
	}
	return buf
}

// encodeStartup encodes a StartupMessage with any protocol version, its
// parameters in sorted order.
func encodeStartup(version uint32, params map[string]string) []byte {
	names := make([]string, 0, len(params))
	for k := range params {
		names = append(names, k)
	}
	sort.Strings(names)
	b := []byte{0, 0, 0, 0}
	b = binary.BigEndian.AppendUint32(b, version)
	for _, k := range names {
		b = append(b, k...)
		b = append(b, 0)
		b = append(b, params[k]...)
		b = append(b, 0)
	}
	b = append(b, 0)
	binary.BigEndian.PutUint32(b, uint32(len(b)))
	return b
}

// requestPacket encodes an 8-byte request (SSLRequest, GSSENCRequest).
func requestPacket(code uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, 8)
	return binary.BigEndian.AppendUint32(b, code)
}

func cancelPacket(pid, secret uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, 16)
	b = binary.BigEndian.AppendUint32(b, cancelRequestCode)
	b = binary.BigEndian.AppendUint32(b, pid)
	return binary.BigEndian.AppendUint32(b, secret)
}

// backendMsg is one raw message from the proxy.
type backendMsg struct {
	typ  byte
	body []byte
}

// next reads one message; io.EOF (or a reset) is returned as an error.
func (c *testClient) next() (backendMsg, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(c.rd, hdr[:]); err != nil {
		return backendMsg{}, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n < 4 || n > 64<<20 {
		return backendMsg{}, fmt.Errorf("bad message length %d for %q", n, hdr[0])
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(c.rd, body); err != nil {
		return backendMsg{}, err
	}
	return backendMsg{typ: hdr[0], body: body}, nil
}

func (c *testClient) mustNext() backendMsg {
	c.t.Helper()
	m, err := c.next()
	if err != nil {
		c.t.Fatalf("client read: %v", err)
	}
	return m
}

// readByte reads a one-byte answer to SSLRequest or GSSENCRequest.
func (c *testClient) readByte() byte {
	c.t.Helper()
	b, err := c.rd.ReadByte()
	if err != nil {
		c.t.Fatalf("client read: %v", err)
	}
	return b
}

// handover is what the client saw from the proxy up to ReadyForQuery or an
// ErrorResponse.
type handover struct {
	types     string // message types in order
	negotiate *negotiation
	params    map[string]string
	key       *pgproto3.BackendKeyData
	notices   []pgproto3.NoticeResponse
	txStatus  byte
	authOK    bool
	err       *pgproto3.ErrorResponse
}

type negotiation struct {
	version uint32 // the newest protocol version the server supports
	options []string
}

// readHandover reads until ReadyForQuery, an ErrorResponse or EOF.
func (c *testClient) readHandover() handover {
	c.t.Helper()
	var h handover
	h.params = make(map[string]string)
	for {
		m, err := c.next()
		if err != nil {
			if h.err == nil {
				c.t.Fatalf("client read after %q: %v", h.types, err)
			}
			return h
		}
		h.types += string(m.typ)
		switch m.typ {
		case 'v':
			h.negotiate = decodeNegotiate(c.t, m.body)
		case 'R':
			if len(m.body) == 4 && binary.BigEndian.Uint32(m.body) == 0 {
				h.authOK = true
			} else {
				c.t.Fatalf("client got an authentication request %x from the proxy", m.body)
			}
		case 'S':
			var ps pgproto3.ParameterStatus
			if err := ps.Decode(m.body); err != nil {
				c.t.Fatalf("decode ParameterStatus: %v", err)
			}
			h.params[ps.Name] = ps.Value
		case 'K':
			var k pgproto3.BackendKeyData
			if err := k.Decode(m.body); err != nil {
				c.t.Fatalf("decode BackendKeyData: %v", err)
			}
			h.key = &k
		case 'N':
			var n pgproto3.NoticeResponse
			if err := n.Decode(m.body); err != nil {
				c.t.Fatalf("decode NoticeResponse: %v", err)
			}
			h.notices = append(h.notices, n)
		case 'Z':
			h.txStatus = m.body[0]
			return h
		case 'E':
			var e pgproto3.ErrorResponse
			if err := e.Decode(m.body); err != nil {
				c.t.Fatalf("decode ErrorResponse: %v", err)
			}
			h.err = &e
		default:
			c.t.Fatalf("unexpected message %q during handover", m.typ)
		}
	}
}

func decodeNegotiate(t *testing.T, b []byte) *negotiation {
	t.Helper()
	if len(b) < 8 {
		t.Fatalf("NegotiateProtocolVersion too short: %x", b)
	}
	n := &negotiation{version: binary.BigEndian.Uint32(b)}
	count := binary.BigEndian.Uint32(b[4:])
	rest := b[8:]
	for i := uint32(0); i < count; i++ {
		j := indexByte(rest, 0)
		if j < 0 {
			t.Fatalf("NegotiateProtocolVersion option %d not terminated: %x", i, b)
		}
		n.options = append(n.options, string(rest[:j]))
		rest = rest[j+1:]
	}
	if len(rest) != 0 {
		t.Fatalf("NegotiateProtocolVersion has %d trailing bytes", len(rest))
	}
	return n
}

func indexByte(b []byte, c byte) int {
	for i, v := range b {
		if v == c {
			return i
		}
	}
	return -1
}

// connect runs a whole startup and fails unless it reaches ReadyForQuery.
func (c *testClient) connect(params map[string]string) handover {
	c.t.Helper()
	c.write(encodeStartup(protocol30, params))
	h := c.readHandover()
	if h.err != nil {
		c.t.Fatalf("handover failed: %s %s", h.err.Code, h.err.Message)
	}
	return h
}

// readError reads messages until EOF and returns the ErrorResponse, if any.
func (c *testClient) readError() *pgproto3.ErrorResponse {
	c.t.Helper()
	var resp *pgproto3.ErrorResponse
	for {
		m, err := c.next()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !isReset(err) {
				c.t.Fatalf("expected the proxy to close the connection, got %v", err)
			}
			return resp
		}
		switch m.typ {
		case 'E':
			var e pgproto3.ErrorResponse
			if err := e.Decode(m.body); err != nil {
				c.t.Fatalf("decode ErrorResponse: %v", err)
			}
			resp = &e
		case 'R':
			if len(m.body) >= 4 && binary.BigEndian.Uint32(m.body) == 0 {
				c.t.Errorf("client got AuthenticationOk on a failed session")
			}
		}
	}
}

// expectClosed fails unless the proxy closes without sending anything.
func (c *testClient) expectClosed() {
	c.t.Helper()
	b := make([]byte, 1)
	n, err := c.rd.Read(b)
	if n != 0 || err == nil {
		c.t.Fatalf("expected the connection to close, read %q (%v)", b[:n], err)
	}
	if !errors.Is(err, io.EOF) && !isReset(err) {
		c.t.Fatalf("expected EOF, got %v", err)
	}
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe"))
}

func sortedCopy(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}

func equalParams(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
