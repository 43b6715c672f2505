package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/protocols/postgres"
	"github.com/credproxy/credproxy/proxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeUpstream accepts connections and answers any startup with trust auth,
// then echoes nothing and waits for Terminate or close.
func fakeUpstream(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				be := pgproto3.NewBackend(pgproto3.NewChunkReader(c), c)
				if _, err := be.ReceiveStartupMessage(); err != nil {
					return
				}
				for _, m := range []pgproto3.BackendMessage{
					&pgproto3.AuthenticationOk{},
					&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"},
					&pgproto3.BackendKeyData{ProcessID: 42, SecretKey: 4242},
					&pgproto3.ReadyForQuery{TxStatus: 'I'},
				} {
					if err := be.Send(m); err != nil {
						return
					}
				}
				for {
					m, err := be.Receive()
					if err != nil {
						return
					}
					if _, ok := m.(*pgproto3.Terminate); ok {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// testOptions are the protocols cmd/credproxy wires in.
func testOptions() proxy.Options {
	return proxy.Options{Protocols: []proxy.Protocol{postgres.NewProtocol(), httpproxy.NewProtocol(httpproxy.ProtocolOptions{})}}
}

func testConfig(t *testing.T, upstream string) *config.Config {
	t.Helper()
	return &config.Config{
		ShutdownGrace: config.Duration(time.Second),
		Audit:         config.Audit{Path: filepath.Join(t.TempDir(), "audit.jsonl")},
		Secrets: map[string]config.Secret{
			"s": {Static: map[string]string{"username": "u", "password": "p"}},
		},
		Postgres: []config.Postgres{{
			Name: "db", Listen: "127.0.0.1:0", Upstream: upstream, Credentials: "s",
			TLS: config.PostgresTLS{Mode: "disable"},
		}},
	}
}

// connect performs a startup through the proxy and returns the open conn.
func connect(t *testing.T, addr string) net.Conn {
	t.Helper()
	network := "tcp"
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", path
	}
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	fe := pgproto3.NewFrontend(pgproto3.NewChunkReader(c), c)
	if err := fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "x", "database": "d"}}); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			return c
		}
	}
}

func TestServerCloseEndsSessionsWithoutLeaks(t *testing.T) {
	srv, err := proxy.New(testConfig(t, fakeUpstream(t)), zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c := connect(t, srv.Addrs()[0].String())
	defer c.Close()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	// The session was closed under the app.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("session not closed by Close: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestShutdownWaitsForGraceThenCloses(t *testing.T) {
	srv, err := proxy.New(testConfig(t, fakeUpstream(t)), zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	addr := srv.Addrs()[0].String()
	c := connect(t, addr)
	defer c.Close()

	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background(), 300*time.Millisecond) }()
	// New connections are refused once shutdown starts.
	deadline := time.Now().Add(5 * time.Second)
	for {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			break
		}
		nc.Close()
		if time.Now().After(deadline) {
			t.Fatal("listener still accepting during shutdown")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after its grace period")
	}
	// The app gets a FATAL, then the connection closes.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("session not closed after the grace period: %v", err)
	}
}

func TestShutdownReturnsEarlyWhenSessionsEnd(t *testing.T) {
	srv, err := proxy.New(testConfig(t, fakeUpstream(t)), zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c := connect(t, srv.Addrs()[0].String())
	term, _ := (&pgproto3.Terminate{}).Encode(nil)
	if _, err := c.Write(term); err != nil {
		t.Fatal(err)
	}
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A grace far longer than the test timeout: returning proves the drain.
	if err := srv.Shutdown(ctx, time.Hour); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Fatal("Shutdown waited for the grace period although no session was open")
	}
}

func TestListenUnixReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".s.PGSQL.5432")
	ln, err := proxy.Listen("unix:"+path, "0600")
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	// A second listener on a live socket is refused.
	if _, err := proxy.Listen("unix:"+path, "0600"); err == nil {
		t.Fatal("second listener on a live socket")
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	// The file left behind is stale and replaced.
	ln2, err := proxy.Listen("unix:"+path, "0600")
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}

func TestKeepAliveFor(t *testing.T) {
	for addr, want := range map[string]time.Duration{
		"127.0.0.1:5432": -1, "127.0.0.2:0": -1, "[::1]:5432": -1, "localhost:5432": -1,
		"0.0.0.0:5432": 0, "10.0.0.7:5432": 0, ":5432": 0, "[::]:5432": 0, "bogus": 0,
	} {
		if got := proxy.KeepAliveFor(addr); got != want {
			t.Errorf("KeepAliveFor(%q) = %v, want %v", addr, got, want)
		}
	}
}
