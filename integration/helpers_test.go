package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/protocols/postgres"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
)

// allRoles are the roles pgtest creates, each with a password.
var allRoles = []string{pgtest.Superuser, pgtest.ScramUser, pgtest.MD5User, pgtest.PasswordUser, pgtest.TrustUser, pgtest.CertUser}

// skipShort skips integration tests under -short, and only then.
func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: runs PostgreSQL; skipped with -short")
	}
}

// startPG starts a PostgreSQL for the test and registers every role's
// password with the no-leak collector.
func startPG(t *testing.T, opts pgtest.Options) *pgtest.Server {
	t.Helper()
	pg := pgtest.Start(t, opts)
	for _, role := range allRoles {
		leaks.addPassword(fmt.Sprintf("%s of %s's server", role, t.Name()), role, pg.Password(role))
	}
	return pg
}

// proxyHarness is an in-process credproxy whose logs and audit records go
// to the no-leak collector.
type proxyHarness struct {
	srv       *proxy.Server
	cfg       *config.Config
	auditPath string
	logs      *lockedBuffer
}

// staticSecret is a static credential source.
func staticSecret(user, password string) config.Secret {
	return config.Secret{Static: map[string]string{"username": user, "password": password}}
}

// pgService is one Postgres service listening on a free loopback port.
func pgService(name, upstream, credential string, tls config.PostgresTLS) config.Postgres {
	if tls.Mode == "" {
		tls.Mode = "disable"
	}
	return config.Postgres{
		Name:           name,
		Listen:         "127.0.0.1:0",
		Upstream:       upstream,
		Credentials:    credential,
		TLS:            tls,
		StartupTimeout: config.Duration(10 * time.Second),
		ConnectTimeout: config.Duration(10 * time.Second),
	}
}

// newLogger builds a debug-level JSON logger writing to w.
func newLogger(w zapcore.WriteSyncer) *zap.Logger {
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(w), zapcore.DebugLevel))
}

// startProxy runs credproxy with cfg (its audit path is set here) until the
// test ends. Its audit log is collected when it is closed; its log is
// collected as written, and shown when the test fails.
func startProxy(t *testing.T, cfg *config.Config) *proxyHarness {
	t.Helper()
	dir := t.TempDir()
	cfg.Audit.Path = filepath.Join(dir, "audit.jsonl")
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = config.Duration(2 * time.Second)
	}
	for _, sec := range cfg.Secrets {
		for k, v := range sec.Static {
			if k == "password" {
				leaks.addSecret(fmt.Sprintf("a static password in %s's config", t.Name()), v)
			}
		}
	}
	p := &proxyHarness{cfg: cfg, auditPath: cfg.Audit.Path,
		logs: leaks.stream(kindLog, t.Name())}
	srv, err := proxy.New(cfg, newLogger(p.logs), proxyOptions())
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	if err := srv.Start(); err != nil {
		t.Fatalf("proxy Start: %v", err)
	}
	p.srv = srv
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("proxy Close: %v", err)
		}
		data, err := os.ReadFile(p.auditPath)
		if err != nil {
			t.Errorf("read audit log: %v", err)
		}
		leaks.add(kindAudit, t.Name(), data)
		if t.Failed() {
			t.Logf("--- proxy log ---\n%s", tail(p.logs.Bytes(), 60))
		}
	})
	return p
}

// proxyOptions wires the protocols in as cmd/credproxy does.
func proxyOptions() proxy.Options {
	return proxy.Options{Protocols: []proxy.Protocol{
		postgres.NewProtocol(),
		httpproxy.NewProtocol(httpproxy.ProtocolOptions{}),
	}}
}

func tail(b []byte, lines int) string {
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// addr is the listen address of the service named name.
func (p *proxyHarness) addr(t *testing.T, name string) string {
	t.Helper()
	addrs := p.srv.Addrs()
	for i, svc := range p.cfg.Postgres {
		if svc.Name == name {
			return addrs[i].String()
		}
	}
	t.Fatalf("no service %q", name)
	return ""
}

// auditRecords reads the audit log so far.
func (p *proxyHarness) auditRecords(t *testing.T) []audit.Record {
	t.Helper()
	data, err := os.ReadFile(p.auditPath)
	if err != nil {
		t.Fatalf("read audit log: %v", err)
	}
	var recs []audit.Record
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read audit log: %v", err)
	}
	return recs
}

// waitAudit waits up to 10s for an audit record matching match.
func (p *proxyHarness) waitAudit(t *testing.T, what string, match func(audit.Record) bool) audit.Record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		recs := p.auditRecords(t)
		for _, r := range recs {
			if match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no audit record: %s; have %d records:\n%s", what, len(recs), auditDump(recs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// endedAuditRecords waits up to limit for every session in the audit log
// to have its session_end, then returns the log. A client such as pgbench
// exits without waiting for the proxy to finish: a migration under way,
// or the session_start written after the app already has ReadyForQuery,
// is recorded a moment later.
func (p *proxyHarness) endedAuditRecords(t *testing.T, limit time.Duration) []audit.Record {
	t.Helper()
	var recs []audit.Record
	opsWaitFor(t, limit, "a session_end for every session_start", func() error {
		recs = p.auditRecords(t)
		open := map[string]bool{}
		for _, r := range recs {
			switch r.Event {
			case audit.EventSessionStart:
				open[r.SessionID] = true
			case audit.EventSessionEnd:
				delete(open, r.SessionID)
			}
		}
		if len(open) > 0 {
			return fmt.Errorf("%d sessions have none", len(open))
		}
		return nil
	})
	return recs
}

func auditDump(recs []audit.Record) string {
	var b strings.Builder
	for _, r := range recs[max(0, len(recs)-20):] {
		j, _ := json.Marshal(r)
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

// event matches records of one event for the given client address.
func event(name, clientAddr string) func(audit.Record) bool {
	return func(r audit.Record) bool {
		return r.Event == name && (clientAddr == "" || r.Client.Addr == clientAddr)
	}
}

func deref(s *string) string {
	if s == nil {
		return "<absent>"
	}
	return *s
}

// appDSN is what an app uses to reach the proxy: no password.
func appDSN(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		panic(err)
	}
	return fmt.Sprintf("host=%s port=%s user=app_user dbname=%s sslmode=disable connect_timeout=15", host, port, pgtest.AppDB)
}

// clientErr records a client-visible error with the no-leak collector and
// returns it.
func clientErr(t *testing.T, err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		msg += fmt.Sprintf("\n%s %s %s %s %s", pgErr.Severity, pgErr.Code, pgErr.Message, pgErr.Detail, pgErr.Hint)
	}
	leaks.add(kindClient, t.Name(), []byte(msg+"\n"))
	return err
}

// connect opens a pgx connection, recording any error.
func connect(t *testing.T, ctx context.Context, dsn string) (*pgx.Conn, error) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("parse DSN: %v", err)
	}
	return connectConfig(t, ctx, cfg)
}

func connectConfig(t *testing.T, ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	t.Helper()
	if cfg.Password != "" {
		t.Fatalf("the app must not have a password")
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, clientErr(t, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn, nil
}

// mustConnect is connect, failing the test on error.
func mustConnect(t *testing.T, ctx context.Context, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := connect(t, ctx, dsn)
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	return conn
}

// queryString runs a one-value query, recording any error.
func queryString(t *testing.T, ctx context.Context, conn *pgx.Conn, sql string, args ...any) (string, error) {
	t.Helper()
	var s string
	err := conn.QueryRow(ctx, sql, args...).Scan(&s)
	return s, clientErr(t, err)
}

func mustQueryString(t *testing.T, ctx context.Context, conn *pgx.Conn, sql string, args ...any) string {
	t.Helper()
	s, err := queryString(t, ctx, conn, sql, args...)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// pgError extracts the PostgreSQL error; it fails the test when there is none.
func pgError(t *testing.T, err error) *pgconn.PgError {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("error %v (%T) is not a PostgreSQL error", err, err)
	}
	return pgErr
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// clientBinary finds a PostgreSQL client program in PATH or
// /usr/lib/postgresql/*/bin; a missing one fails the test.
func clientBinary(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) > 0 {
		return matches[len(matches)-1]
	}
	t.Fatalf("%s not found in PATH or /usr/lib/postgresql/*/bin; run scripts/pgenv.sh", name)
	return ""
}

// runClient runs a PostgreSQL client program with no password available
// to it (PGPASSWORD unset, PGPASSFILE=/dev/null), collecting its output for
// the no-leak check. It returns stdout, and stdout and stderr together.
func runClient(t *testing.T, timeout time.Duration, name string, args ...string) (stdout, all string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, clientBinary(t, name), args...)
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PGPASSWORD=") && !strings.HasPrefix(kv, "PGPASSFILE=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "PGPASSFILE="+os.DevNull, "PGCONNECT_TIMEOUT=15")
	var outBuf, allBuf lockedBuffer
	cmd.Stdout = io.MultiWriter(&outBuf, &allBuf)
	cmd.Stderr = &allBuf
	err = cmd.Run()
	leaks.add(kindOutput, t.Name()+": "+name, allBuf.Bytes())
	return string(outBuf.Bytes()), string(allBuf.Bytes()), err
}

// rawConn dials the proxy without a client library.
func rawConn(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readUntilClosed reads everything the peer sends until it closes the
// connection or limit passes. closed is false when the peer did not close.
func readUntilClosed(c net.Conn, limit time.Duration) (data []byte, closed bool, err error) {
	_ = c.SetReadDeadline(time.Now().Add(limit))
	data, err = io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return data, false, nil
	}
	if errors.Is(err, net.ErrClosed) || isReset(err) {
		return data, true, nil
	}
	return data, err == nil, err
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// errorResponseCode extracts the SQLSTATE of the first ErrorResponse in
// data, "" when there is none.
func errorResponseCode(data []byte) string {
	for len(data) >= 5 {
		typ := data[0]
		n := int(binary.BigEndian.Uint32(data[1:5]))
		if n < 4 || len(data) < 1+n {
			return ""
		}
		body := data[5 : 1+n]
		if typ == 'E' {
			for _, f := range bytes.Split(body, []byte{0}) {
				if len(f) > 0 && f[0] == 'C' {
					return string(f[1:])
				}
			}
		}
		data = data[1+n:]
	}
	return ""
}

// cancelRequest encodes a CancelRequest packet.
func cancelRequest(pid, secret uint32) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint32(b[0:], 16)
	binary.BigEndian.PutUint32(b[4:], 80877102)
	binary.BigEndian.PutUint32(b[8:], pid)
	binary.BigEndian.PutUint32(b[12:], secret)
	return b
}

// sslRequest is the SSLRequest packet.
var sslRequest = []byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// noTLSUpstream is a fake PostgreSQL that answers SSLRequest with 'N' and
// records whatever is sent after that: a proxy that fell back to cleartext
// would send its StartupMessage next.
type noTLSUpstream struct {
	ln net.Listener
	wg sync.WaitGroup

	mu        sync.Mutex
	conns     int
	sslAsked  int
	afterN    [][]byte // bytes received after answering 'N', per connection
	firstNotS int      // connections whose first packet was not SSLRequest
}

func startNoTLSUpstream(t *testing.T) *noTLSUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &noTLSUpstream{ln: ln}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				f.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
	})
	return f
}

func (f *noTLSUpstream) serve(c net.Conn) {
	defer c.Close()
	f.mu.Lock()
	f.conns++
	f.mu.Unlock()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	first := make([]byte, 8)
	if _, err := io.ReadFull(c, first); err != nil {
		return
	}
	if !bytes.Equal(first, sslRequest) {
		f.mu.Lock()
		f.firstNotS++
		f.mu.Unlock()
		return
	}
	f.mu.Lock()
	f.sslAsked++
	f.mu.Unlock()
	if _, err := c.Write([]byte{'N'}); err != nil {
		return
	}
	rest, _ := io.ReadAll(c) // until the proxy closes, or the deadline
	f.mu.Lock()
	f.afterN = append(f.afterN, rest)
	f.mu.Unlock()
}

func (f *noTLSUpstream) addr() string { return f.ln.Addr().String() }

// portOf returns the port of a host:port.
func portOf(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := strconv.Atoi(port); err != nil {
		t.Fatal(err)
	}
	return port
}
