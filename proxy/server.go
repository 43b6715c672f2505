// Package proxy is credproxy's engine: it builds the credential store and
// the audit log, has the protocols it is given build one handler per
// configured service, binds their listeners, serves sessions, reloads its
// config live, shuts down gracefully, and serves metrics and probes. It
// imports no protocol: protocols import it, for the interfaces they plug
// into (protocol.go) and the metrics they count with.
package proxy

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
	"github.com/credproxy/credproxy/proxy/limit"
)

// Server is a running credproxy.
type Server struct {
	log     *zap.Logger
	metrics *Metrics
	audit   *swapSink
	store   *credentials.Store
	// protocols build the services (Options.Protocols).
	protocols []Protocol

	// sessCtx is every session's context; cancelling it force-closes them.
	sessCtx  context.Context
	killAll  context.CancelFunc
	sessions sync.WaitGroup // every session goroutine
	bg       sync.WaitGroup // accept loops, the admin server, removal timers

	admin *admin // nil without an admin block

	// running is the config in force, for readers that must not wait for
	// a reload in progress (a SIGTERM reading shutdown_grace).
	running atomic.Pointer[config.Config]

	// reloadMu serialises Start, Reload and Close; mu guards the fields
	// below it, which probes and accept loops read.
	reloadMu sync.Mutex
	cfg      *config.Config
	svcs     []Service // the config's services, in order; written under mu too
	sources  map[string]credentials.Source
	vault    *credentials.VaultClient   // nil without a vault block
	vaults   []*credentials.VaultClient // every client made, closed at Close
	audits   []*audit.Writer            // every audit file opened, closed at Close
	closers  []func() error             // every handler with resources of its own
	limits   map[string]*limit.Listener // each listener's counters, by Service.key
	share    int                        // Env.Share of the running config
	budget   *limit.Budget              // the process's open-file budget, shared by every listener
	// pods are DaemonSet mode's published pods (nil without workloads);
	// files are what the config's services were built from, in that mode.
	pods  *podSet
	files []string

	mu         sync.Mutex
	listeners  map[string]*listener // by Service.key
	started    bool                 // every listener bound
	draining   bool
	closeOnce  sync.Once
	closeError error

	// Test hooks: reloadBound runs once a reload has bound its new
	// listeners and before it commits; closeLocking runs as Close is about
	// to wait for a reload in progress.
	hookReloadBound  func()
	hookCloseLocking func()
}

// New builds everything the config describes, the services with o's
// protocols, but binds nothing.
func New(cfg *config.Config, log *zap.Logger, o Options) (*Server, error) {
	s := &Server{log: log, metrics: NewMetrics(), audit: &swapSink{}, protocols: o.Protocols,
		listeners: make(map[string]*listener), limits: make(map[string]*limit.Listener),
		budget: limit.NewBudget(limit.OpenFileLimit())}
	s.sessCtx, s.killAll = context.WithCancel(context.Background())
	s.metrics.registerReady(func() bool { return len(s.notReady()) == 0 })
	s.metrics.registerAuditWaiting(s.audit.waiting)
	b, err := s.build(cfg)
	if err != nil {
		return nil, err
	}
	opts := credentials.Options{Logger: log, Observer: s.metrics}
	if v := cfg.Vault; v != nil {
		opts.FetchTimeout = v.RequestTimeout.D()
		opts.RevokeUnused = v.RevokeUnused == nil || *v.RevokeUnused
		opts.RevokeOnClose = v.RevokeOnShutdown == nil || *v.RevokeOnShutdown
	}
	s.store = credentials.NewStore(b.sources, opts)
	s.commit(b)
	if cfg.Workloads != nil {
		if s.pods, err = newPodSet(s, cfg); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Start logs in to Vault (if configured), fetches every credential once so
// the first sessions need not wait, binds every listener and starts
// accepting. A credential that cannot be fetched yet is logged, not fatal:
// sessions get a clear error until its source recovers, and /readyz says
// so. A bind failure closes what was bound and returns the error.
func (s *Server) Start() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if a := s.cfg.Admin; a != nil && a.Listen != "" {
		adm, err := newAdmin(a.Listen, s)
		if err != nil {
			return err
		}
		s.admin = adm
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			adm.serve()
		}()
		s.log.Info("admin listening", zap.String("listen", adm.ln.Addr().String()))
	}
	if s.vault != nil {
		s.vault.Start(s.sessCtx)
	}
	for name, err := range s.store.Warm(s.sessCtx) {
		s.log.Warn("credential not available at start", zap.String("credential", name), zap.Error(err))
	}
	var bound []*listener
	for _, svc := range s.svcs {
		l, err := s.bind(svc)
		if err != nil {
			for _, b := range bound {
				b.ln.Close()
			}
			return fmt.Errorf("%s: %w", svc.Name, err)
		}
		bound = append(bound, l)
	}
	s.mu.Lock()
	for _, l := range bound {
		s.listeners[l.key] = l
		s.serve(l)
	}
	s.started = true
	s.mu.Unlock()
	return nil
}

// Metrics returns the server's metrics (and their registry).
func (s *Server) Metrics() *Metrics { return s.metrics }

// AdminAddr is the bound admin address, or nil without an admin block.
func (s *Server) AdminAddr() net.Addr {
	if s.admin == nil {
		return nil
	}
	return s.admin.ln.Addr()
}

// Addrs returns the bound listener addresses in the order the protocols
// built their services (Options.Protocols, each in config order).
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []net.Addr
	for _, svc := range s.svcs {
		if l, ok := s.listeners[svc.key()]; ok {
			out = append(out, l.ln.Addr())
		}
	}
	return out
}

// Shutdown stops accepting (readiness flips at once), lets open sessions
// finish for up to grace, then closes the rest, revokes leases and closes
// the audit log. A cancelled ctx ends the grace period early.
func (s *Server) Shutdown(ctx context.Context, grace time.Duration) error {
	s.stopAccepting()
	gctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	// Handlers with connections of their own (HTTP keep-alive) close the
	// idle ones now and let busy ones finish within the grace period.
	var handlers sync.WaitGroup
	s.mu.Lock()
	for _, l := range s.listeners {
		if sd := l.svc.Shutdown; sd != nil {
			handlers.Add(1)
			go func() {
				defer handlers.Done()
				_ = sd(gctx)
			}()
		}
	}
	s.mu.Unlock()
	drained := make(chan struct{})
	go func() {
		s.sessions.Wait()
		handlers.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-gctx.Done():
		if ctx.Err() == nil {
			s.log.Warn("shutdown grace elapsed; closing open sessions", zap.Duration("grace", grace))
		}
	}
	err := s.Close()
	<-drained
	return err
}

// Close stops accepting, ends every open session at once (with a FATAL at
// a message boundary), waits for their goroutines, revokes the leases it
// owns (vault.revoke_on_shutdown), and closes the audit log. It is
// idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.stopAccepting()
		s.killAll()
		s.sessions.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.store.Close(ctx)
		cancel()
		if s.hookCloseLocking != nil {
			s.hookCloseLocking()
		}
		// A reload in progress finishes first: killAll has cut its Vault
		// login short, and it closes rather than serves the listeners it
		// bound, since draining is set.
		s.reloadMu.Lock()
		if s.pods != nil {
			revoke := s.cfg.Vault == nil || s.cfg.Vault.RevokeOnShutdown == nil || *s.cfg.Vault.RevokeOnShutdown
			s.pods.closeAll(revoke)
		}
		for _, c := range s.closers {
			_ = c()
		}
		for _, v := range s.vaults {
			v.Close()
		}
		if s.admin != nil {
			s.admin.close()
		}
		s.bg.Wait()
		for _, w := range s.audits {
			if err := w.Close(); err != nil && s.closeError == nil {
				s.closeError = err
			}
		}
		s.reloadMu.Unlock()
	})
	return s.closeError
}

// stopAccepting flips readiness and closes every session listener. The
// admin server stays up for probes and scrapes until Close.
func (s *Server) stopAccepting() {
	s.mu.Lock()
	s.draining = true
	ls := make([]*listener, 0, len(s.listeners))
	for _, l := range s.listeners {
		ls = append(ls, l)
	}
	s.mu.Unlock()
	if s.pods != nil {
		s.pods.stopAccepting(s.pods.snapshot())
	}
	for _, l := range ls {
		l.ln.Close()
		<-l.done
	}
}

// swapSink forwards audit records to the current writer, so a reload can
// move the audit log without touching the handlers that write to it.
type swapSink struct {
	mu   sync.RWMutex
	sink audit.Sink
}

func (s *swapSink) Record(r *audit.Record) {
	s.mu.RLock()
	sink := s.sink
	s.mu.RUnlock()
	if sink != nil {
		sink.Record(r)
	}
}

// waiting is how many records wait for the current audit writer.
func (s *swapSink) waiting() int {
	if w, ok := s.current().(interface{ Waiting() int }); ok {
		return w.Waiting()
	}
	return 0
}

func (s *swapSink) current() audit.Sink {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.sink
}

func (s *swapSink) set(sink audit.Sink) {
	s.mu.Lock()
	s.sink = sink
	s.mu.Unlock()
}
