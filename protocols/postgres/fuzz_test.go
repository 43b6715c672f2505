package postgres

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// catchPanic reports a panic as a test failure (with its stack), so that a
// crasher in the corpus fails one test instead of ending the test binary;
// the fuzzing engine records such failures just like panics.
func catchPanic(t *testing.T) {
	if r := recover(); r != nil {
		t.Fatalf("panic: %v\n%s", r, debug.Stack())
	}
}

// startupSeeds are realistic first packets, whole and cut short.
func startupSeeds() [][]byte {
	startup := encodeStartup(protocol30, map[string]string{
		"user": "app", "database": "appdb", "application_name": "psql", "client_encoding": "UTF8",
	})
	v32 := encodeStartup(3<<16|2, map[string]string{"user": "app", "_pq_.protocol_managed_params": "1", "_pq_.foo": "x"})
	ssl := requestPacket(sslRequestCode)
	seeds := [][]byte{
		startup,
		ssl,
		requestPacket(gssEncRequestCode),
		cancelPacket(1234, 0xdeadbeef),
		v32,
		encodeStartup(2<<16, map[string]string{"user": "app"}),
		append(append([]byte(nil), ssl...), startup...),
		append(requestPacket(gssEncRequestCode), ssl...),
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		{0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0},
		{0, 0, 0, 8, 0, 3, 0, 0},
		{},
	}
	for _, p := range [][]byte{startup, v32, cancelPacket(1, 2)} {
		seeds = append(seeds, p[:3], p[:8], p[:len(p)-1])
	}
	return seeds
}

func FuzzStartupPacket(f *testing.F) {
	for _, s := range startupSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		defer catchPanic(t)
		p, err := readStartupPacket(bytes.NewReader(data))
		if err != nil {
			return
		}
		n := binary.BigEndian.Uint32(data)
		if n < 8 || n > maxStartupPacket || int(n) != 8+len(p.body) {
			t.Fatalf("accepted length %d with a %d-byte body", n, len(p.body))
		}
		switch p.code {
		case cancelRequestCode:
			cr, err := decodeCancel(p)
			if err == nil && (len(p.body) != 8 || cr.ProcessID != binary.BigEndian.Uint32(p.body) || cr.SecretKey != binary.BigEndian.Uint32(p.body[4:])) {
				t.Fatalf("decodeCancel accepted a %d-byte body as %+v", len(p.body), cr)
			}
		case sslRequestCode, gssEncRequestCode:
			if len(p.body) != 0 {
				t.Fatalf("request with a %d-byte body accepted", len(p.body))
			}
		default:
			if p.major() != 3 {
				return
			}
			if p.params == nil {
				t.Fatalf("protocol 3 packet accepted without parameters")
			}
			rest, unrecognized := splitProtocolOptions(p.params)
			if len(rest)+len(unrecognized) != len(p.params) {
				t.Fatalf("splitProtocolOptions lost parameters")
			}
			v := appendNegotiateProtocolVersion(nil, protocol30, unrecognized)
			if v[0] != 'v' || int(binary.BigEndian.Uint32(v[1:])) != len(v)-1 {
				t.Fatalf("NegotiateProtocolVersion length field %d for %d bytes", binary.BigEndian.Uint32(v[1:]), len(v)-1)
			}
			if int(binary.BigEndian.Uint32(v[9:])) != len(unrecognized) {
				t.Fatalf("NegotiateProtocolVersion option count wrong")
			}
		}
	})
}

func FuzzStatementText(f *testing.F) {
	enc := func(m pgproto3.FrontendMessage) []byte { b, _ := m.Encode(nil); return b[5:] }
	f.Add(false, enc(&pgproto3.Query{String: "SELECT 1"}), false)
	f.Add(false, enc(&pgproto3.Query{String: "SELECT 1"}), true)
	f.Add(true, enc(&pgproto3.Parse{Name: "s1", Query: "SELECT $1", ParameterOIDs: []uint32{23}}), false)
	f.Add(true, enc(&pgproto3.Parse{Name: "", Query: "INSERT INTO t VALUES ($1, $2)", ParameterOIDs: []uint32{23, 25}}), true)
	f.Add(true, []byte("s1\x00SELECT"), false)
	f.Add(false, []byte("no terminator"), false)
	f.Add(false, []byte{0}, false)
	f.Add(true, []byte{0, 0, 0xff, 0xff}, false)
	f.Fuzz(func(t *testing.T, isParse bool, body []byte, truncated bool) {
		defer catchPanic(t)
		typ := byte('Q')
		if isParse {
			typ = 'P'
		}
		sql, ok := statementText(typ, body, truncated)
		if !ok {
			return
		}
		if len(sql) > len(body) {
			t.Fatalf("statement text (%d bytes) longer than the body (%d)", len(sql), len(body))
		}
		if bytes.IndexByte(sql, 0) >= 0 {
			t.Fatalf("statement text contains NUL: %q", sql)
		}
		if !bytes.Contains(body, sql) {
			t.Fatalf("statement text %q is not in the body", sql)
		}
	})
}

// handshakeHandler is a Handler whose upstream never answers (nothing
// listens on 127.0.0.1:1) and whose timeouts are short.
func handshakeHandler(f *testing.F) *Handler {
	src, err := credentials.NewStatic(map[string]string{"username": testUser, "password": testPassword})
	if err != nil {
		f.Fatal(err)
	}
	h, err := NewHandler(Options{
		Service: config.Postgres{
			Name: "fuzz", Upstream: "127.0.0.1:1", Credentials: "c",
			TLS:            config.PostgresTLS{Mode: "disable"},
			StartupTimeout: config.Duration(50 * time.Millisecond),
			ConnectTimeout: config.Duration(500 * time.Millisecond),
		},
		Credentials: credentials.NewStore(map[string]credentials.Source{"c": src}, credentials.Options{}),
		Audit:       audit.Discard{},
		Logger:      zap.NewNop(),
	})
	if err != nil {
		f.Fatal(err)
	}
	return h
}

func FuzzHandshakeClient(f *testing.F) {
	for _, s := range startupSeeds() {
		f.Add(s, false)
		f.Add(s, true)
	}
	h := handshakeHandler(f)
	f.Fuzz(func(t *testing.T, data []byte, hangUp bool) {
		defer catchPanic(t)
		client, server := net.Pipe()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, _ = client.Write(data)
			if hangUp {
				client.Close()
			}
		}()
		go func() {
			defer wg.Done()
			_, _ = io.Copy(io.Discard, client)
		}()
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("ServeConn panicked: %v\n%s", r, debug.Stack())
				}
			}()
			_ = h.ServeConn(context.Background(), server, "fuzz")
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("ServeConn did not return")
		}
		client.Close()
		wg.Wait()
	})
}
