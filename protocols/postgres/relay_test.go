package postgres

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// readUntilReady reads messages up to ReadyForQuery and returns their types.
func (c *testClient) readUntilReady() string {
	c.t.Helper()
	var types []byte
	for {
		m := c.mustNext()
		types = append(types, m.typ)
		if m.typ == 'E' {
			var e pgproto3.ErrorResponse
			_ = e.Decode(m.body)
			c.t.Errorf("ErrorResponse %s %s", e.Code, e.Message)
		}
		if m.typ == 'Z' {
			return string(types)
		}
	}
}

// terminate ends a session cleanly and checks ServeConn's result.
func terminate(t *testing.T, p *testProxy, c *testClient) {
	t.Helper()
	c.send(&pgproto3.Terminate{})
	if err := p.wait(t); err != nil {
		t.Errorf("ServeConn: %v", err)
	}
}

// ---- cancel ----

func TestCancelRequest(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	h := c.connect(map[string]string{"user": "appuser"})

	cancel := func(t *testing.T, pid, secret uint32) {
		t.Helper()
		cc := dialProxy(t, p.addr)
		cc.write(cancelPacket(pid, secret))
		cc.expectClosed() // PostgreSQL answers a cancel with nothing
		if err := p.wait(t); err != nil {
			t.Errorf("cancel ServeConn: %v", err)
		}
	}
	noCancelSent := func(t *testing.T, conns int) {
		t.Helper()
		// forward waits for the upstream to close after reading the cancel,
		// so a forwarded cancel is already recorded when ServeConn returns.
		up.mu.Lock()
		defer up.mu.Unlock()
		if len(up.cancels) != 0 || len(up.conns) != conns {
			t.Errorf("upstream got %d cancels and %d connections, want 0 and %d", len(up.cancels), len(up.conns), conns)
		}
	}

	t.Run("unknown key", func(t *testing.T) {
		cancel(t, h.key.ProcessID^1, h.key.SecretKey)
		cancel(t, h.key.ProcessID, h.key.SecretKey^1)
		cancel(t, upstreamPID, upstreamSecret) // the upstream's own key means nothing to the proxy
		noCancelSent(t, 1)
	})
	t.Run("issued key reaches the upstream with its own key", func(t *testing.T) {
		cancel(t, h.key.ProcessID, h.key.SecretKey)
		select {
		case cr := <-up.cancelCh:
			if cr.ProcessID != upstreamPID || cr.SecretKey != upstreamSecret {
				t.Errorf("upstream got cancel %d/%#x, want %d/%#x", cr.ProcessID, cr.SecretKey, upstreamPID, upstreamSecret)
			}
		case <-time.After(ioTimeout):
			t.Fatalf("no cancel reached the upstream")
		}
	})
	t.Run("key is void after the session ends", func(t *testing.T) {
		terminate(t, p, c)
		up.mu.Lock()
		conns := len(up.conns)
		up.cancels = nil
		up.mu.Unlock()
		cancel(t, h.key.ProcessID, h.key.SecretKey)
		noCancelSent(t, conns)
	})
}

func TestCancelAcrossServices(t *testing.T) {
	// One registry serves every service: a cancel sent to another listener
	// still reaches the right upstream.
	up := startUpstream(t, trustScript(true))
	other := startUpstream(t, trustScript(true))
	reg := NewCancelRegistry()
	p1 := startProxy(t, testService(up.addr), withCancels(reg))
	svc2 := testService(other.addr)
	svc2.Name = "otherdb"
	p2 := startProxy(t, svc2, withCancels(reg))

	c := dialProxy(t, p1.addr)
	h := c.connect(map[string]string{"user": "appuser"})
	cc := dialProxy(t, p2.addr)
	cc.write(cancelPacket(h.key.ProcessID, h.key.SecretKey))
	cc.expectClosed()
	if err := p2.wait(t); err != nil {
		t.Errorf("cancel ServeConn: %v", err)
	}
	select {
	case cr := <-up.cancelCh:
		if cr.ProcessID != upstreamPID {
			t.Errorf("cancel pid = %d", cr.ProcessID)
		}
	case <-time.After(ioTimeout):
		t.Fatalf("no cancel reached the session's upstream")
	}
	if n := other.connCount(); n != 0 {
		t.Errorf("the other service's upstream got %d connections", n)
	}
}

// Issued keys carry the backend's own process id (many backends of many
// servers may share one) and a secret of credproxy's; every key is
// distinct, and void once unregistered.
func TestCancelRegistryIssue(t *testing.T) {
	r := NewCancelRegistry()
	seen := make(map[uint64]bool)
	var entries []*cancelEntry
	for i := range 1000 {
		pid := uint32(i % 10) // 0: the backend sent none
		e := r.issue(cancelTarget{has: pid != 0, key: pgproto3.BackendKeyData{ProcessID: pid, SecretKey: 12345}})
		k := e.key
		if k.ProcessID == 0 || int32(k.ProcessID) < 0 {
			t.Fatalf("issued pid %d is not a positive int32", k.ProcessID)
		}
		if pid != 0 && (k.ProcessID != pid || k.SecretKey == 12345) {
			t.Fatalf("issued %d/%d for backend %d/12345; want its pid and another secret", k.ProcessID, k.SecretKey, pid)
		}
		ck := cancelKey(k.ProcessID, k.SecretKey)
		if seen[ck] {
			t.Fatalf("key issued twice")
		}
		seen[ck] = true
		tgt, ok := r.lookup(k.ProcessID, k.SecretKey)
		if !ok || tgt.key.ProcessID != pid {
			t.Fatalf("lookup of issued key %d = %+v, %v", i, tgt, ok)
		}
		entries = append(entries, e)
	}
	// A migration points a key at another backend.
	entries[1].update(cancelTarget{has: true, key: pgproto3.BackendKeyData{ProcessID: 777, SecretKey: 1}})
	if tgt, _ := r.lookup(entries[1].key.ProcessID, entries[1].key.SecretKey); tgt.key.ProcessID != 777 {
		t.Errorf("after update the key targets %d, want 777", tgt.key.ProcessID)
	}
	for _, e := range entries {
		e.unregister()
	}
	r.mu.Lock()
	n := len(r.targets)
	r.mu.Unlock()
	if n != 0 {
		t.Errorf("%d keys left after unregistering all", n)
	}
}

// ---- audit ----

func TestCleanSessionAudit(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser", "database": "appdb"})
	c.send(&pgproto3.Query{String: "SELECT 1"})
	c.readUntilReady()
	terminate(t, p, c)

	if got := strings.Join(p.audit.events(), ","); got != "session_start,session_end" {
		t.Fatalf("events = %s, want session_start,session_end", got)
	}
	start := p.audit.find(audit.EventSessionStart)[0]
	end := p.audit.find(audit.EventSessionEnd)[0]
	clientAddr := c.conn.LocalAddr().String()
	for _, r := range []audit.Record{start, end} {
		if r.SessionID != "test-session" || r.Protocol != "postgres" || r.Service != "appdb" || r.Client.Addr != clientAddr {
			t.Errorf("%s common fields = %q %q %q %q, want test-session postgres appdb %s",
				r.Event, r.SessionID, r.Protocol, r.Service, r.Client.Addr, clientAddr)
		}
	}
	if start.DBUser != testUser || start.Credential != "c" || start.Upstream != up.addr || start.Database != "appdb" {
		t.Errorf("session_start = db_user %q credential %q upstream %q database %q", start.DBUser, start.Credential, start.Upstream, start.Database)
	}
	if start.Lease != nil {
		t.Errorf("static credential audited with a lease: %+v", start.Lease)
	}
	if end.Error == nil || *end.Error != "" {
		t.Errorf("session_end error = %v, want empty string", end.Error)
	}
	if end.BytesIn == nil || end.BytesOut == nil || end.DurationMS == nil {
		t.Fatalf("session_end lacks bytes or duration: %+v", end)
	}
	if *end.BytesIn <= 0 || *end.BytesOut <= 0 {
		t.Errorf("session_end bytes in/out = %d/%d, want > 0", *end.BytesIn, *end.BytesOut)
	}

	var started, ended bool
	for _, e := range p.logs.All() {
		switch e.Message {
		case "session started":
			started = true
		case "session ended":
			ended = true
		}
		if e.ContextMap()["session_id"] != "test-session" {
			t.Errorf("log %q lacks session_id: %v", e.Message, e.ContextMap())
		}
	}
	if !started || !ended {
		t.Errorf("log lines: started %v, ended %v", started, ended)
	}
}

func TestAuditQueries(t *testing.T) {
	tests := []struct {
		name    string
		queries bool
		want    []string
	}{
		{"on", true, []string{"SELECT 1", "SELECT $1::int", "INSERT INTO t VALUES ('ünïcode')"}},
		{"off", false, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			var opts []proxyOption
			if tc.queries {
				opts = append(opts, withAuditQueries)
			}
			p := startProxy(t, testService(up.addr), opts...)
			c := dialProxy(t, p.addr)
			c.connect(map[string]string{"user": "appuser"})
			c.send(&pgproto3.Query{String: "SELECT 1"})
			c.readUntilReady()
			c.send(&pgproto3.Parse{Name: "s1", Query: "SELECT $1::int", ParameterOIDs: []uint32{23}},
				&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("7")}},
				&pgproto3.Execute{}, &pgproto3.Sync{})
			if got := c.readUntilReady(); got != "12CZ" {
				t.Errorf("extended query answers = %q, want 12CZ", got)
			}
			c.send(&pgproto3.Query{String: "INSERT INTO t VALUES ('ünïcode')"})
			c.readUntilReady()
			terminate(t, p, c)

			var got []string
			for _, r := range p.audit.find(audit.EventQuery) {
				got = append(got, r.SQL)
				if r.SQLTruncated {
					t.Errorf("query %q marked truncated", r.SQL)
				}
				if r.SessionID != "test-session" {
					t.Errorf("query record session_id = %q", r.SessionID)
				}
			}
			if strings.Join(got, "|") != strings.Join(tc.want, "|") {
				t.Errorf("audited queries = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestAuditLongQueryTruncated(t *testing.T) {
	long := "SELECT '" + strings.Repeat("x", maxAuditSQL+100) + "'"
	var gotLen int
	var mu sync.Mutex
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		u.serve(func(m pgproto3.FrontendMessage) {
			if q, ok := m.(*pgproto3.Query); ok {
				mu.Lock()
				gotLen = len(q.String)
				mu.Unlock()
			}
		})
	})
	p := startProxy(t, testService(up.addr), withAuditQueries)
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: long})
	c.readUntilReady()
	terminate(t, p, c)
	mu.Lock()
	defer mu.Unlock()
	if gotLen != len(long) {
		t.Errorf("upstream got a %d-byte query, want %d", gotLen, len(long))
	}
	q := p.audit.find(audit.EventQuery)
	if len(q) != 1 {
		t.Fatalf("%d query records, want 1", len(q))
	}
	if !q[0].SQLTruncated || len(q[0].SQL) != maxAuditSQL || !strings.HasPrefix(long, q[0].SQL) {
		t.Errorf("record: truncated %v, %d bytes; want truncated, the first %d bytes", q[0].SQLTruncated, len(q[0].SQL), maxAuditSQL)
	}
}

// Bytes the app sends right behind its StartupMessage (in the same segment)
// are buffered during the handshake; with auditing on they must still be
// audited, and the auditor must stay in frame for the rest of the session.
func TestAuditQueriesPipelinedWithStartup(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	p := startProxy(t, testService(up.addr), withAuditQueries)
	c := dialProxy(t, p.addr)
	pkt := encodeStartup(protocol30, map[string]string{"user": "appuser"})
	pkt = append(pkt, encodeFrontend(t, &pgproto3.Query{String: "SELECT 'pipelined behind startup'"})...)
	c.write(pkt)
	h := c.readHandover()
	if h.err != nil {
		t.Fatalf("handover: %s", h.err.Message)
	}
	c.readUntilReady()
	c.send(&pgproto3.Query{String: "SELECT 'second'"})
	c.readUntilReady()
	terminate(t, p, c)

	var got []string
	for _, r := range p.audit.find(audit.EventQuery) {
		got = append(got, r.SQL)
	}
	want := []string{"SELECT 'pipelined behind startup'", "SELECT 'second'"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("audited queries = %q, want %q", got, want)
	}
}

// An empty Query body ('Q' with length 4) makes pgproto3/v2's Query.Decode
// slice src[:-1] and panic; in the relay goroutine nothing would recover it,
// so one client could take the whole proxy process down when audit.queries
// is on. The scenario runs in a child test process so that a crash is
// reported instead of ending this test binary.
func TestAuditEmptyQueryDoesNotCrash(t *testing.T) {
	if os.Getenv("CREDPROXY_TEST_CRASH_CHILD") == "1" {
		up := startUpstream(t, trustScript(true))
		p := startProxy(t, testService(up.addr), withAuditQueries)
		c := dialProxy(t, p.addr)
		c.connect(map[string]string{"user": "appuser"})
		// The upstream may refuse the empty Query and close before the rest
		// is written: only a crash matters here, so write errors are fine.
		q, _ := (&pgproto3.Query{String: "SELECT 1"}).Encode([]byte{'Q', 0, 0, 0, 4})
		_, _ = c.conn.Write(q)
		_, _ = c.next()
		term, _ := (&pgproto3.Terminate{}).Encode(nil)
		_, _ = c.conn.Write(term)
		_ = p.wait(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAuditEmptyQueryDoesNotCrash$", "-test.count=1")
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_CRASH_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		lines := strings.SplitN(string(out), "\n", 12)
		t.Errorf("a client sending an empty Query crashed the proxy process (%v):\n%s", err, strings.Join(lines[:min(len(lines), 11)], "\n"))
	}
}

// ---- pass-through ----

func TestPipelinedExtendedProtocol(t *testing.T) {
	const n = 50
	for _, queries := range []bool{false, true} {
		t.Run(fmt.Sprintf("audit queries %v", queries), func(t *testing.T) {
			var mu sync.Mutex
			var seen []string
			up := startUpstream(t, func(u *upConn) {
				if !u.ready(true) {
					return
				}
				u.serve(func(m pgproto3.FrontendMessage) {
					mu.Lock()
					defer mu.Unlock()
					switch m := m.(type) {
					case *pgproto3.Parse:
						seen = append(seen, "P:"+m.Query)
					case *pgproto3.Bind:
						seen = append(seen, "B")
					case *pgproto3.Describe:
						seen = append(seen, "D")
					case *pgproto3.Execute:
						seen = append(seen, "E")
					case *pgproto3.Sync:
						seen = append(seen, "S")
					}
				})
			})
			var opts []proxyOption
			if queries {
				opts = append(opts, withAuditQueries)
			}
			p := startProxy(t, testService(up.addr), opts...)
			c := dialProxy(t, p.addr)
			c.connect(map[string]string{"user": "appuser"})

			var msgs []pgproto3.FrontendMessage
			var want []string
			for i := range n {
				q := fmt.Sprintf("SELECT %d", i)
				msgs = append(msgs, &pgproto3.Parse{Query: q}, &pgproto3.Bind{}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{})
				want = append(want, "P:"+q, "B", "D", "E")
			}
			msgs = append(msgs, &pgproto3.Sync{})
			want = append(want, "S")
			c.send(msgs...) // one write
			got := c.readUntilReady()
			if wantTypes := strings.Repeat("12nC", n) + "Z"; got != wantTypes {
				t.Errorf("answers = %q, want %q", got, wantTypes)
			}
			terminate(t, p, c)
			mu.Lock()
			defer mu.Unlock()
			if strings.Join(seen, ",") != strings.Join(want, ",") {
				t.Errorf("upstream saw %d messages %v..., want %d in order", len(seen), seen[:min(len(seen), 8)], len(want))
			}
			if queries {
				if got := len(p.audit.find(audit.EventQuery)); got != n {
					t.Errorf("%d query records, want %d", got, n)
				}
			}
		})
	}
}

// copyPayload is 10 MB of pseudo-random bytes, cut into CopyData messages of
// varied sizes (some larger than the relay's buffers, some tiny).
func copyPayload() (data []byte, sizes []int) {
	r := rand.New(rand.NewPCG(1, 2))
	data = make([]byte, 10<<20)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	for off := 0; off < len(data); {
		var n int
		switch r.IntN(4) {
		case 0:
			n = 1 + r.IntN(16)
		case 1:
			n = 1 + r.IntN(16<<10)
		case 2:
			n = 16<<10 + r.IntN(64<<10)
		default:
			n = 1<<20 + r.IntN(1<<20)
		}
		n = min(n, len(data)-off)
		sizes = append(sizes, n)
		off += n
	}
	return data, sizes
}

func TestCopyInLarge(t *testing.T) {
	data, sizes := copyPayload()
	want := sha256.Sum256(data)
	for _, queries := range []bool{false, true} {
		t.Run(fmt.Sprintf("audit queries %v", queries), func(t *testing.T) {
			type result struct {
				sum   [32]byte
				n     int
				msgs  int
				other string
			}
			results := make(chan result, 1)
			up := startUpstream(t, func(u *upConn) {
				if !u.ready(true) {
					return
				}
				q, ok := u.receive().(*pgproto3.Query)
				if !ok || q.String != "COPY t FROM STDIN" {
					u.t.Errorf("upstream got %v, want the COPY query", q)
					return
				}
				u.send(&pgproto3.CopyInResponse{OverallFormat: 0})
				h := sha256.New()
				var res result
				for {
					m := u.receive()
					if m == nil {
						res.other = "EOF"
						break
					}
					if d, ok := m.(*pgproto3.CopyData); ok {
						h.Write(d.Data)
						res.n += len(d.Data)
						res.msgs++
						continue
					}
					if _, ok := m.(*pgproto3.CopyDone); !ok {
						res.other = fmt.Sprintf("%T", m)
					}
					break
				}
				copy(res.sum[:], h.Sum(nil))
				results <- res
				u.send(&pgproto3.CommandComplete{CommandTag: []byte(fmt.Sprintf("COPY %d", res.msgs))}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
				u.serve(nil)
			})
			var opts []proxyOption
			if queries {
				opts = append(opts, withAuditQueries)
			}
			p := startProxy(t, testService(up.addr), opts...)
			c := dialProxy(t, p.addr)
			c.connect(map[string]string{"user": "appuser"})
			c.send(&pgproto3.Query{String: "COPY t FROM STDIN"})
			if m := c.mustNext(); m.typ != 'G' {
				t.Fatalf("got %q, want CopyInResponse", m.typ)
			}
			var buf []byte
			off := 0
			for _, n := range sizes {
				buf, _ = (&pgproto3.CopyData{Data: data[off : off+n]}).Encode(buf[:0])
				c.write(buf)
				off += n
			}
			c.send(&pgproto3.CopyDone{})
			res := <-results
			if res.other != "" {
				t.Errorf("copy ended with %s, want CopyDone", res.other)
			}
			if res.n != len(data) || res.msgs != len(sizes) || res.sum != want {
				t.Errorf("upstream got %d bytes in %d messages (sha256 match %v), want %d bytes in %d messages",
					res.n, res.msgs, res.sum == want, len(data), len(sizes))
			}
			c.readUntilReady()
			terminate(t, p, c)

			end := p.audit.find(audit.EventSessionEnd)
			if len(end) != 1 || *end[0].BytesIn < int64(len(data)) {
				t.Errorf("session_end = %+v, want bytes_in >= %d", end, len(data))
			}
			if queries {
				q := p.audit.find(audit.EventQuery)
				if len(q) != 1 || q[0].SQL != "COPY t FROM STDIN" {
					t.Errorf("query records: %d, want just the COPY statement", len(q))
				}
			}
		})
	}
}

func TestCopyOutLarge(t *testing.T) {
	data, sizes := copyPayload()
	want := sha256.Sum256(data)
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		if _, ok := u.receive().(*pgproto3.Query); !ok {
			return
		}
		u.send(&pgproto3.CopyOutResponse{OverallFormat: 0})
		off := 0
		for _, n := range sizes {
			if !u.send(&pgproto3.CopyData{Data: data[off : off+n]}) {
				return
			}
			off += n
		}
		u.send(&pgproto3.CopyDone{}, &pgproto3.CommandComplete{CommandTag: []byte("COPY 1")}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
		u.serve(nil)
	})
	p := startProxy(t, testService(up.addr), withAuditQueries)
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: "COPY t TO STDOUT"})
	h := sha256.New()
	total := 0
	for {
		m := c.mustNext()
		if m.typ == 'd' {
			h.Write(m.body)
			total += len(m.body)
			continue
		}
		if m.typ == 'Z' {
			break
		}
	}
	if got := h.Sum(nil); total != len(data) || !bytes.Equal(got, want[:]) {
		t.Errorf("client got %d bytes (sha256 match %v), want %d", total, bytes.Equal(got, want[:]), len(data))
	}
	terminate(t, p, c)
	end := p.audit.find(audit.EventSessionEnd)
	if len(end) != 1 || *end[0].BytesOut < int64(len(data)) {
		t.Errorf("session_end = %+v, want bytes_out >= %d", end, len(data))
	}
}

func TestUpstreamClosesSession(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		u.receive()
		u.send(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"})
	})
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: "SELECT pg_sleep(10)"})
	if resp := c.readError(); resp == nil || resp.Code != "57P01" {
		t.Errorf("client got %+v, want the upstream's 57P01", resp)
	}
	_ = p.wait(t)
	if end := p.audit.find(audit.EventSessionEnd); len(end) != 1 {
		t.Errorf("session_end records: %d, want 1", len(end))
	}
}

func TestShutdownTerminatesSession(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	p := startProxy(t, testService(up.addr))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	result := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			result <- err
			return
		}
		result <- p.h.ServeConn(ctx, conn, "test-session")
	}()
	c := dialProxy(t, ln.Addr().String())
	c.connect(map[string]string{"user": "appuser"})
	cancel()
	// Like PostgreSQL's own shutdown: FATAL 57P01, then the connection closes.
	resp := c.readError()
	if resp == nil || resp.Code != "57P01" || resp.Severity != "FATAL" {
		t.Errorf("client got %+v, want FATAL 57P01", resp)
	}
	select {
	case err := <-result:
		if err == nil || !strings.Contains(err.Error(), "shutting down") {
			t.Errorf("ServeConn after cancel = %v, want a shutdown error", err)
		}
	case <-time.After(ioTimeout):
		t.Fatalf("ServeConn did not return after its context was cancelled")
	}
	end := p.audit.find(audit.EventSessionEnd)
	if len(end) != 1 || end[0].Error == nil || *end[0].Error == "" || end[0].SQLState != "57P01" {
		t.Errorf("session_end = %+v, want an error and sqlstate 57P01", end)
	}
}

func TestShutdownDuringHandshake(t *testing.T) {
	// The upstream never answers the StartupMessage; shutdown must still
	// end the session promptly.
	release := make(chan struct{})
	up := startUpstream(t, func(u *upConn) { <-release })
	t.Cleanup(func() { close(release) })
	p := startProxy(t, testService(up.addr))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	result := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			result <- err
			return
		}
		result <- p.h.ServeConn(ctx, conn, "test-session")
	}()
	c := dialProxy(t, ln.Addr().String())
	c.write(encodeStartup(protocol30, map[string]string{"user": "appuser"}))
	for up.connCount() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-result:
		if err == nil {
			t.Errorf("ServeConn returned nil after shutdown during the handshake")
		}
	case <-time.After(ioTimeout):
		t.Fatalf("ServeConn did not return after its context was cancelled")
	}
	_ = c.readError()
	if len(p.audit.find(audit.EventSessionStart)) != 0 {
		t.Errorf("session audited as started")
	}
}

// serveOne serves one connection with a context of its own, for shutdown
// tests; it returns the address to dial, the context's cancel and
// ServeConn's result.
func serveOne(t *testing.T, p *testProxy) (string, context.CancelFunc, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	result := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			result <- err
			return
		}
		result <- p.h.ServeConn(ctx, conn, "test-session")
	}()
	return ln.Addr().String(), cancel, result
}

// TestShutdownDuringCopyOut ends a session while the upstream is in the
// middle of a large COPY TO: the app must get whole messages, then the
// FATAL, never a message cut short.
func TestShutdownDuringCopyOut(t *testing.T) {
	data, sizes := copyPayload()
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		if _, ok := u.receive().(*pgproto3.Query); !ok {
			return
		}
		u.send(&pgproto3.CopyOutResponse{})
		for { // until the proxy goes away
			off := 0
			for _, n := range sizes {
				var buf []byte
				buf, _ = (&pgproto3.CopyData{Data: data[off : off+n]}).Encode(buf)
				if _, err := u.conn.Write(buf); err != nil {
					return
				}
				off += n
			}
		}
	})
	p := startProxy(t, testService(up.addr))
	addr, cancel, result := serveOne(t, p)
	c := dialProxy(t, addr)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: "COPY t TO STDOUT"})
	if m := c.mustNext(); m.typ != 'H' {
		t.Fatalf("got %q, want CopyOutResponse", m.typ)
	}
	var got int
	for got < 3<<20 {
		m := c.mustNext()
		if m.typ != 'd' {
			t.Fatalf("got %q during COPY", m.typ)
		}
		got += len(m.body)
	}
	cancel()
	var last backendMsg
	for {
		m, err := c.next()
		if err != nil {
			break // EOF after the FATAL; a torn message fails in next() or below
		}
		if m.typ != 'd' && m.typ != 'E' {
			t.Fatalf("got message type %q after %d bytes: the stream was cut mid-message", m.typ, got)
		}
		if last.typ == 'E' {
			t.Fatalf("message %q after the FATAL", m.typ)
		}
		got += len(m.body)
		last = m
	}
	if last.typ != 'E' {
		t.Fatalf("stream ended with %q, want the FATAL ErrorResponse", last.typ)
	}
	var e pgproto3.ErrorResponse
	if err := e.Decode(last.body); err != nil || e.Code != "57P01" {
		t.Errorf("final message %+v (%v), want 57P01", e, err)
	}
	select {
	case <-result:
	case <-time.After(ioTimeout):
		t.Fatalf("ServeConn did not return")
	}
}

// leasedSource hands out leased credentials whose passwords count up.
type leasedSource struct {
	ttl   time.Duration
	mu    sync.Mutex
	calls int
}

func (l *leasedSource) Fetch(context.Context) (*credentials.Credential, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	return &credentials.Credential{
		Fields: map[string]credentials.Secret{
			"username": credentials.NewSecret(fmt.Sprintf("v-app-%d", l.calls)),
			"password": credentials.NewSecret(fmt.Sprintf("%s-%d", testPassword, l.calls)),
		},
		Lease: credentials.Lease{ID: fmt.Sprintf("database/creds/app/lease-%d", l.calls), TTL: l.ttl},
	}, nil
}

func (l *leasedSource) fetches() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}

// A leased credential the upstream refuses (revoked out of band) is dropped
// and a fresh one tried, without the app seeing the failure.
func TestLeasedCredentialRefusedIsReplaced(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		u.send(&pgproto3.AuthenticationCleartextPassword{})
		_ = u.be.SetAuthType(pgproto3.AuthTypeCleartextPassword)
		pm, ok := u.receive().(*pgproto3.PasswordMessage)
		if !ok || pm.Password != testPassword+"-2" || u.params["user"] != "v-app-2" {
			u.send(authFailed(u.params["user"]))
			return
		}
		if u.ready(true) {
			u.serve(nil)
		}
	})
	src := &leasedSource{ttl: time.Hour}
	store := newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
	p := startProxy(t, testService(up.addr), withCredentials(store))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	terminate(t, p, c)
	if n := src.fetches(); n != 2 {
		t.Errorf("source fetched %d times, want 2", n)
	}
	if n := up.connCount(); n != 2 {
		t.Errorf("upstream got %d connections, want 2", n)
	}
	start := p.audit.find(audit.EventSessionStart)
	if len(start) != 1 || start[0].DBUser != "v-app-2" || start[0].Lease == nil || start[0].Lease.IDSHA256 == "" {
		t.Fatalf("session_start = %+v, want db_user v-app-2 with a lease", start)
	}
	if strings.Contains(start[0].Lease.IDSHA256, "lease-2") {
		t.Errorf("audit shows the lease id in clear")
	}
	if ttl := start[0].Lease.TTLSecs; ttl <= 0 || ttl > 3600 {
		t.Errorf("lease ttl_s = %d, want (0, 3600]", ttl)
	}
}

// A session on a lease that ends (not renewable) is closed with a FATAL
// before the database would drop the role.
// A session whose credential's lease ends moves, at an idle point, to a
// new backend logged in with a fresh credential; the app notices nothing.
func TestLeaseEndMigratesIdleSession(t *testing.T) {
	var mu sync.Mutex
	var seen []string // user: message, per upstream connection
	up := startUpstream(t, func(u *upConn) {
		if u.ready(true) {
			u.serve(func(m pgproto3.FrontendMessage) {
				mu.Lock()
				seen = append(seen, fmt.Sprintf("%s:%T", u.params["user"], m))
				mu.Unlock()
			})
		}
	})
	src := &leasedSource{ttl: 3 * time.Second}
	store := newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
	p := startProxy(t, testService(up.addr), withCredentials(store))
	c := dialProxy(t, p.addr)
	h := c.connect(map[string]string{"user": "appuser"})
	// The lease cannot be renewed: at two thirds of its TTL it is retired
	// and the session moves.
	rec := p.audit.wait(t, audit.EventSessionMigrated, 10*time.Second)
	if rec.DBUser != "v-app-2" || rec.FromLeaseSHA256 == "" || rec.ToLeaseSHA256 == "" || rec.FromLeaseSHA256 == rec.ToLeaseSHA256 {
		t.Errorf("session_migrated = %+v", rec)
	}
	c.send(&pgproto3.Query{String: "SELECT 1"})
	if got := c.readUntilReady(); got != "CZ" {
		t.Errorf("after the migration a query got %q", got)
	}
	mu.Lock()
	got := strings.Join(seen, " ")
	mu.Unlock()
	// The old backend got credproxy's queries (its state) and a Terminate;
	// the app's query went to the new one.
	if !strings.Contains(got, "v-app-1:*pgproto3.Terminate") || !strings.HasSuffix(got, "v-app-2:*pgproto3.Query") {
		t.Errorf("upstream saw %s", got)
	}
	// The cancel key the app holds now cancels on the new backend.
	if tgt, ok := p.cancels.lookup(h.key.ProcessID, h.key.SecretKey); !ok || !tgt.has {
		t.Errorf("the app's cancel key no longer resolves after the migration")
	}
	terminate(t, p, c)
}

// An app that sends its next query the moment a ReadyForQuery arrives
// (pgbench, a busy pool) still moves: the migration claims the idle point
// before the ReadyForQuery reaches the app. The hook holds the backend copy
// back after each write, as a busy machine does, so the app's next query
// is always in flight before that copy could look again.
func TestLeaseEndMigratesBusySession(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		if u.ready(true) {
			u.serve(nil)
		}
	})
	testHookToClientWrote = func() { time.Sleep(2 * time.Millisecond) }
	t.Cleanup(func() { testHookToClientWrote = nil }) // after the proxy's cleanup, which waits for its sessions
	src := &leasedSource{ttl: 3 * time.Second}
	store := newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
	p := startProxy(t, testService(up.addr), withCredentials(store))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	deadline := time.Now().Add(10 * time.Second)
	queries := 0
	for len(p.audit.find(audit.EventSessionMigrated)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a session answering every ReadyForQuery at once did not move in 10s (%d queries)", queries)
		}
		c.send(&pgproto3.Query{String: "SELECT 1"})
		if got := c.readUntilReady(); got != "CZ" {
			t.Fatalf("query %d got %q", queries, got)
		}
		queries++
	}
	if rec := p.audit.find(audit.EventSessionMigrated)[0]; rec.DBUser != "v-app-2" {
		t.Errorf("session_migrated = %+v", rec)
	}
	terminate(t, p, c)
}

// The credential a session moved to is retired before the session
// watches it (OnRetire then calls at once, while the migration is still
// running): the session moves again rather than wait for the end.
func TestLeaseRetiredDuringMigrationMovesAgain(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		if u.ready(true) {
			u.serve(nil)
		}
	})
	var once sync.Once
	testHookMigrated = func(h *credentials.Handle) { once.Do(h.Invalidate) }
	t.Cleanup(func() { testHookMigrated = nil })
	src := &leasedSource{ttl: 3 * time.Second}
	store := newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
	p := startProxy(t, testService(up.addr), withCredentials(store))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	deadline := time.Now().Add(10 * time.Second)
	for len(p.audit.find(audit.EventSessionMigrated)) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("migrations: %+v; want a second one, off the credential retired during the first", p.audit.find(audit.EventSessionMigrated))
		}
		time.Sleep(50 * time.Millisecond)
	}
	ms := p.audit.find(audit.EventSessionMigrated)
	if ms[0].DBUser != "v-app-2" || ms[1].DBUser != "v-app-3" {
		t.Errorf("migrated to %s, then %s; want v-app-2, then v-app-3", ms[0].DBUser, ms[1].DBUser)
	}
	c.send(&pgproto3.Query{String: "SELECT 1"})
	if got := c.readUntilReady(); got != "CZ" {
		t.Errorf("after the migrations a query got %q", got)
	}
	terminate(t, p, c)
}

// A session that stays inside a transaction cannot move: at the lease's
// end it gets a FATAL, as before migration existed.
func TestLeaseEndTerminatesSessionInTransaction(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		for {
			switch u.receive().(type) {
			case nil, *pgproto3.Terminate:
				return
			case *pgproto3.Query:
				u.send(&pgproto3.CommandComplete{CommandTag: []byte("BEGIN")}, &pgproto3.ReadyForQuery{TxStatus: 'T'})
			}
		}
	})
	src := &leasedSource{ttl: 2 * time.Second}
	store := newStore(t, map[string]credentials.Source{"c": src}, credentials.Options{})
	p := startProxy(t, testService(up.addr), withCredentials(store))
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: "BEGIN"})
	c.readUntilReady()
	resp := c.readError() // blocks until the proxy ends the session
	if resp == nil || resp.Severity != "FATAL" || !strings.Contains(resp.Message, "lease") {
		t.Fatalf("client got %+v, want a FATAL about the lease", resp)
	}
	_ = p.wait(t)
	end := p.audit.find(audit.EventSessionEnd)
	if len(end) != 1 || end[0].SQLState != resp.Code {
		t.Errorf("session_end = %+v, want sqlstate %s", end, resp.Code)
	}
	if m := p.audit.find(audit.EventSessionMigrated); len(m) != 0 {
		t.Errorf("a session inside a transaction was migrated: %+v", m)
	}
}

// BUG: bytes the upstream sent right behind its ReadyForQuery are read
// ahead into upstream.rd during login and written to the app by drain()
// before copyToClient starts, but they are not fed to copyToClient's
// msgTracker, which assumes it starts at a message boundary. When those
// bytes end inside a message, a termination (shutdown, lease end) writes the
// FATAL into the middle of that message and the app sees a corrupt stream.
// This test fails until the drained bytes advance the tracker (see the report).
func TestTerminateAfterReadAheadKeepsFraming(t *testing.T) {
	notice, _ := (&pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: "00000",
		Message: strings.Repeat("n", 8000)}).Encode(nil)
	rest := make(chan struct{})
	up := startUpstream(t, func(u *upConn) {
		var hs []byte
		for _, m := range []pgproto3.BackendMessage{&pgproto3.AuthenticationOk{}, &pgproto3.BackendKeyData{ProcessID: upstreamPID, SecretKey: upstreamSecret}, &pgproto3.ReadyForQuery{TxStatus: 'I'}} {
			hs, _ = m.Encode(hs)
		}
		// The handshake and the start of an asynchronous notice in one write.
		if _, err := u.conn.Write(append(hs, notice[:100]...)); err != nil {
			return
		}
		<-rest
		_, _ = u.conn.Write(notice[100:])
		u.serve(nil)
	})
	p := startProxy(t, testService(up.addr))
	addr, cancel, result := serveOne(t, p)
	c := dialProxy(t, addr)
	c.connect(map[string]string{"user": "appuser"})
	cancel()
	time.Sleep(100 * time.Millisecond) // well inside boundaryWait
	close(rest)

	m, err := c.next()
	if err != nil {
		t.Fatalf("the notice in flight at shutdown arrived torn: %v", err)
	}
	if m.typ != 'N' || len(m.body) != len(notice)-5 {
		t.Fatalf("got %q with %d bytes, want the whole notice", m.typ, len(m.body))
	}
	if resp := c.readError(); resp == nil || resp.Code != "57P01" {
		t.Errorf("after the notice got %+v, want FATAL 57P01", resp)
	}
	<-result
}
