// Package proxy runs credproxy: it builds the credential store, the audit log
// and one protocol handler per configured service, binds their listeners,
// serves sessions and shuts down gracefully.
package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/postgres"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// ConnHandler serves one accepted connection; it owns and closes conn.
type ConnHandler interface {
	ServeConn(ctx context.Context, conn net.Conn, sessionID string) error
}

// Server is a running credproxy.
type Server struct {
	cfg   *config.Config
	log   *zap.Logger
	audit audit.Sink
	store *credentials.Store
	vault *credentials.VaultClient // nil without a vault block

	closeAudit func() error
	services   []service

	// sessCtx is every session's context; cancelling it force-closes them.
	sessCtx    context.Context
	killAll    context.CancelFunc
	sessions   sync.WaitGroup
	accepters  sync.WaitGroup
	mu         sync.Mutex
	listeners  []net.Listener
	closed     bool
	closeOnce  sync.Once
	closeError error
}

type service struct {
	name    string
	listen  string
	handler ConnHandler
}

// New builds everything the config describes but binds nothing.
func New(cfg *config.Config, log *zap.Logger) (*Server, error) {
	s := &Server{cfg: cfg, log: log, audit: audit.Discard{}, closeAudit: func() error { return nil }}
	if cfg.Vault != nil {
		vc, err := credentials.NewVaultClient(*cfg.Vault, log)
		if err != nil {
			return nil, err
		}
		s.vault = vc
	}
	sources, err := BuildSources(cfg.Secrets, s.vault)
	if err != nil {
		return nil, err
	}
	opts := credentials.Options{Logger: log}
	if v := cfg.Vault; v != nil {
		opts.FetchTimeout = v.RequestTimeout.D()
		opts.RevokeUnused = v.RevokeUnused == nil || *v.RevokeUnused
		opts.RevokeOnClose = v.RevokeOnShutdown == nil || *v.RevokeOnShutdown
	}
	s.store = credentials.NewStore(sources, opts)
	if cfg.Audit.Path != "" {
		alog := log.Named("audit")
		w, err := audit.Open(cfg.Audit.Path, func(err error) { alog.Error("audit write failed", zap.Error(err)) })
		if err != nil {
			return nil, err
		}
		s.audit, s.closeAudit = w, w.Close
	}
	cancels := postgres.NewCancelRegistry()
	for _, pc := range cfg.Postgres {
		h, err := postgres.NewHandler(postgres.Options{
			Service:      pc,
			Credentials:  s.store,
			Audit:        s.audit,
			AuditQueries: cfg.Audit.Queries,
			Cancels:      cancels,
			Logger:       log.Named("postgres").With(zap.String("service", pc.Name)),
		})
		if err != nil {
			s.closeAudit()
			return nil, err
		}
		s.services = append(s.services, service{name: pc.Name, listen: pc.Listen, handler: h})
	}
	s.sessCtx, s.killAll = context.WithCancel(context.Background())
	return s, nil
}

// BuildSources creates a credential source per configured secret; vault is
// the client for vault sources (nil when none is configured).
func BuildSources(secrets map[string]config.Secret, vault *credentials.VaultClient) (map[string]credentials.Source, error) {
	out := make(map[string]credentials.Source, len(secrets))
	for name, sc := range secrets {
		switch {
		case sc.Static != nil:
			src, err := credentials.NewStatic(sc.Static)
			if err != nil {
				return nil, fmt.Errorf("secrets.%s.static: %w", name, err)
			}
			out[name] = src
		case sc.Env != nil:
			out[name] = credentials.NewEnv(sc.Env)
		case sc.Vault != nil:
			if vault == nil {
				return nil, fmt.Errorf("secrets.%s.vault: no vault block configured", name)
			}
			out[name] = credentials.NewVault(vault, *sc.Vault)
		}
	}
	return out, nil
}

// Start logs in to Vault (if configured), fetches every credential once so
// the first sessions need not wait, binds every listener and starts
// accepting. A credential that cannot be fetched yet is logged, not fatal:
// sessions get a clear error until its source recovers. A bind failure
// closes what was bound and returns the error.
func (s *Server) Start() error {
	if s.vault != nil {
		s.vault.Start(s.sessCtx)
	}
	for name, err := range s.store.Warm(s.sessCtx) {
		s.log.Warn("credential not available at start", zap.String("credential", name), zap.Error(err))
	}
	for _, svc := range s.services {
		ln, err := Listen(svc.listen)
		if err != nil {
			s.Close()
			return fmt.Errorf("%s: %w", svc.name, err)
		}
		s.mu.Lock()
		s.listeners = append(s.listeners, ln)
		s.mu.Unlock()
		s.log.Info("listening", zap.String("service", svc.name), zap.String("listen", svc.listen))
		s.accepters.Add(1)
		go func() {
			defer s.accepters.Done()
			s.accept(ln, svc)
		}()
	}
	return nil
}

// Addrs returns the bound listener addresses, in config order.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.listeners))
	for i, ln := range s.listeners {
		out[i] = ln.Addr()
	}
	return out
}

// Listen binds "host:port" (TCP) or "unix:/path". A stale socket file left by
// a previous run is removed; any other existing file is an error.
func Listen(addr string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return net.Listen("tcp", addr)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: file exists and is not a socket", addr)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: another process is listening", addr)
		}
		_ = os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	return ln, nil
}

func (s *Server) accept(ln net.Listener, svc service) {
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait, don't spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept failed", zap.String("service", svc.name), zap.Error(err), zap.Duration("retry_in", backoff))
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.sessions.Add(1)
		go func() {
			defer s.sessions.Done()
			id := newSessionID()
			// A bug in one session must not take down the others.
			defer func() {
				if r := recover(); r != nil {
					conn.Close()
					s.log.Error("session panicked", zap.String("service", svc.name), zap.String("session_id", id),
						zap.Any("panic", r), zap.Stack("stack"))
				}
			}()
			_ = svc.handler.ServeConn(s.sessCtx, conn, id)
		}()
	}
}

// newSessionID returns 96 random bits in hex.
func newSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Shutdown stops accepting, lets open sessions finish for up to grace, then
// closes the rest, and finally closes the audit log. It is Close with a
// grace period; a cancelled ctx ends the grace period early.
func (s *Server) Shutdown(ctx context.Context, grace time.Duration) error {
	s.stopAccepting()
	drained := make(chan struct{})
	go func() {
		s.sessions.Wait()
		close(drained)
	}()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-drained:
	case <-t.C:
		s.log.Warn("shutdown grace elapsed; closing open sessions", zap.Duration("grace", grace))
	case <-ctx.Done():
	}
	return s.Close()
}

// Close stops accepting, closes every open session at once, waits for their
// goroutines and closes the audit log. It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.stopAccepting()
		s.killAll()
		s.sessions.Wait()
		// Leases are revoked once no session uses them.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.store.Close(ctx)
		cancel()
		if s.vault != nil {
			s.vault.Close()
		}
		s.closeError = s.closeAudit()
	})
	return s.closeError
}

func (s *Server) stopAccepting() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for _, ln := range s.listeners {
			ln.Close()
		}
	}
	s.mu.Unlock()
	s.accepters.Wait()
}
