package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/proxy"
)

// blockedReload starts a reload that adds a listener and holds it after
// binding, before it commits. release lets it go on (also at cleanup).
func blockedReload(t *testing.T, srv *proxy.Server, cfg *config.Config) (reloaded <-chan error, release func()) {
	t.Helper()
	next := *cfg
	next.Postgres = append(slices.Clone(cfg.Postgres), config.Postgres{
		Name: "db2", Listen: "127.0.0.1:0", Upstream: cfg.Postgres[0].Upstream, Credentials: "s",
		TLS: config.PostgresTLS{Mode: "disable"},
	})
	bound, gate := make(chan struct{}), make(chan struct{})
	proxy.SetHookReloadBound(srv, func() {
		close(bound)
		<-gate
	})
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)
	done := make(chan error, 1)
	go func() { done <- srv.Reload(&next) }()
	<-bound
	return done, release
}

func startServer(t *testing.T, cfg *config.Config) *proxy.Server {
	t.Helper()
	srv, err := proxy.New(cfg, zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	return srv
}

// A SIGTERM reads shutdown_grace through Config; a slow reload (a bind, a
// Vault login) must not delay it.
func TestConfigDoesNotWaitForReload(t *testing.T) {
	cfg := testConfig(t, fakeUpstream(t))
	srv := startServer(t, cfg)
	defer srv.Close()
	reloaded, release := blockedReload(t, srv, cfg)

	got := make(chan *config.Config, 1)
	go func() { got <- srv.Config() }()
	select {
	case c := <-got:
		if c != cfg {
			t.Error("Config did not return the running config")
		}
	case <-time.After(10 * time.Second):
		release()
		t.Fatal("Config waited for the reload in progress")
	}
	release()
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	if c := srv.Config(); c == cfg || len(c.Postgres) != 2 {
		t.Error("Config did not return the reloaded config")
	}
}

// A shutdown that begins while a reload is adding a listener must close
// that listener too, not wait forever on its accept loop.
func TestShutdownDuringReloadClosesNewListeners(t *testing.T) {
	cfg := testConfig(t, fakeUpstream(t))
	srv := startServer(t, cfg)
	reloaded, release := blockedReload(t, srv, cfg)

	// Close has stopped the listeners it knew of and waits for the reload.
	closing := make(chan struct{})
	proxy.SetHookCloseLocking(srv, func() { close(closing) })
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background(), time.Second) }()
	<-closing
	release()
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown hung on the listener the reload added")
	}
	if n := len(srv.Addrs()); n != 1 {
		t.Errorf("%d listeners registered after shutdown, want the 1 it closed", n)
	}
}

// counterValue reads one series of a counter vector from the registry.
func counterValue(t *testing.T, srv *proxy.Server, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// The engine keeps a listener's counters across reloads: a changed
// service's new handler counts the sessions its old one still serves.
// Refusals are counted in credproxy_connections_refused_total.
func TestLimitsCarryAcrossReloadAndAreCounted(t *testing.T) {
	cfg := testConfig(t, fakeUpstream(t))
	cfg.Postgres[0].MaxSessions = 1
	srv := startServer(t, cfg)
	defer srv.Close()
	addr := srv.Addrs()[0].String()
	c := connect(t, addr)
	defer c.Close()

	next := *cfg
	next.Postgres = slices.Clone(cfg.Postgres)
	next.Postgres[0].StartupTimeout = config.Duration(5 * time.Second) // a changed service: a new handler
	if err := srv.Reload(&next); err != nil {
		t.Fatal(err)
	}
	if refusal := startupError(t, addr); refusal == nil || refusal.Code != "53300" {
		t.Fatalf("a second session after the reload: %+v, want 53300", refusal)
	}
	want := map[string]string{"protocol": "postgres", "service": "db", "reason": "max_sessions"}
	if v := counterValue(t, srv, "credproxy_connections_refused_total", want); v != 1 {
		t.Errorf("credproxy_connections_refused_total%v = %v, want 1", want, v)
	}
}

// startupError runs a startup and returns the ErrorResponse it ends with,
// or nil if it reaches ReadyForQuery.
func startupError(t *testing.T, addr string) *pgproto3.ErrorResponse {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fe := pgproto3.NewFrontend(pgproto3.NewChunkReader(c), c)
	if err := fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "x", "database": "d"}}); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("startup: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			return m
		case *pgproto3.ReadyForQuery:
			return nil
		}
	}
}

// The HTTP proxy's pass-through never reaches credproxy's other listeners
// — the admin server, a Postgres service — even with an empty deny list.
func TestTunnelRefusesOwnListeners(t *testing.T) {
	dir := t.TempDir()
	if err := httpproxy.InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, fakeUpstream(t))
	cfg.Admin = &config.Admin{Listen: "127.0.0.1:0"}
	cfg.HTTP = &config.HTTP{Listen: "127.0.0.1:0", Default: "tunnel", TunnelDeny: []string{},
		CA: config.HTTPCA{CertFile: filepath.Join(dir, httpproxy.CACertFile), KeyFile: filepath.Join(dir, httpproxy.CAKeyFile)}}
	srv := startServer(t, cfg)
	defer srv.Close()
	addrs := srv.Addrs()
	proxyAddr := addrs[len(addrs)-1].String()
	for _, target := range []string{srv.AdminAddr().String(), addrs[0].String()} {
		c, err := net.Dial("tcp", proxyAddr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		c.Close()
		if err != nil || resp.StatusCode != http.StatusForbidden {
			t.Errorf("CONNECT %s: %v %v, want 403", target, resp, err)
		}
	}
}
