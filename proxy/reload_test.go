package proxy

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
)

// blockedReload starts a reload that adds a listener and holds it after
// binding, before it commits. release lets it go on (also at cleanup).
func blockedReload(t *testing.T, srv *Server, cfg *config.Config) (reloaded <-chan error, release func()) {
	t.Helper()
	next := *cfg
	next.Postgres = append(slices.Clone(cfg.Postgres), config.Postgres{
		Name: "db2", Listen: "127.0.0.1:0", Upstream: cfg.Postgres[0].Upstream, Credentials: "s",
		TLS: config.PostgresTLS{Mode: "disable"},
	})
	bound, gate := make(chan struct{}), make(chan struct{})
	srv.hookReloadBound = func() {
		close(bound)
		<-gate
	}
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)
	done := make(chan error, 1)
	go func() { done <- srv.Reload(&next) }()
	<-bound
	return done, release
}

func startServer(t *testing.T, cfg *config.Config) *Server {
	t.Helper()
	srv, err := New(cfg, zap.NewNop())
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
	srv.hookCloseLocking = func() { close(closing) }
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
