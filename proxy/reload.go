package proxy

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Reload applies a new config to the running server:
//   - a listener whose service settings did not change keeps serving, its
//     open sessions untouched;
//   - a changed service keeps its listener; new sessions use the new
//     settings, open sessions carry on with the old;
//   - a removed listener stops accepting, and its open sessions are closed
//     after shutdown_grace;
//   - secrets whose settings or static file contents changed are re-read for
//     new sessions.
//
// A config that cannot be applied (a bind fails, a file cannot be read) is
// rejected as a whole and the old one keeps serving. admin.listen changes
// need a restart.
func (s *Server) Reload(cfg *config.Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	err := s.reload(cfg)
	s.metrics.configReloads.WithLabelValues(result(err)).Inc()
	if err != nil {
		s.log.Error("config reload rejected; the running config keeps serving", zap.Error(err))
		return err
	}
	return nil
}

func (s *Server) reload(cfg *config.Config) error {
	s.mu.Lock()
	stopped := s.draining || !s.started
	s.mu.Unlock()
	if stopped {
		return errors.New("not running")
	}
	if (s.cfg.Workloads == nil) != (cfg.Workloads == nil) {
		return errors.New("workloads: adding or removing the workloads block needs a restart")
	}
	if !reflect.DeepEqual(s.cfg.Admin, cfg.Admin) {
		s.log.Warn("admin settings changed; they take effect at the next restart")
	}

	// Everything that can fail comes first.
	b, err := s.build(cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	current := s.listeners
	s.mu.Unlock()
	var added []*listener
	want := make(map[string]Service, len(b.svcs))
	for _, sv := range b.svcs {
		want[sv.key()] = sv
		if _, ok := current[sv.key()]; ok {
			continue
		}
		l, err := s.bind(sv)
		if err != nil {
			for _, a := range added {
				a.ln.Close()
			}
			b.discard()
			return fmt.Errorf("%s: %w", sv.Name, err)
		}
		added = append(added, l)
	}
	if s.hookReloadBound != nil {
		s.hookReloadBound()
	}
	changedSecrets := s.changedSecrets(cfg, b.sources)
	if b.newVault {
		b.vault.Start(s.sessCtx) // log in before sessions use the new sources
	}

	// Commit.
	s.store.Update(b.sources, changedSecrets)
	podsChanged := s.pods != nil && workloadsChanged(s.cfg, cfg)
	s.commit(b)
	if podsChanged {
		if err := s.pods.reconfigure(cfg, cfg.ShutdownGrace.D()); err != nil {
			s.log.Error("config reloaded, but some pods could not be given their new listeners", zap.Error(err))
		}
	}
	var kept, changed, removed int
	s.mu.Lock()
	for key, l := range current {
		sv, ok := want[key]
		switch {
		case !ok:
			delete(s.listeners, key)
			s.retire(l, cfg.ShutdownGrace.D())
			removed++
		case reflect.DeepEqual(l.spec, sv.Spec):
			sv.release() // the running handler stays
			kept++
		default:
			old := l.svc
			l.name, l.spec, l.svc = sv.Name, sv.Spec, sv
			l.handler.Store(&handlerRef{h: sv.Handler, name: sv.Name})
			s.drainHandler(old, cfg.ShutdownGrace.D())
			changed++
		}
	}
	// A shutdown that began during the reload has already closed the
	// listeners it knew of and would wait forever on an accept loop
	// started now: close the new listeners instead of serving them.
	draining := s.draining
	for _, l := range added {
		if draining {
			l.ln.Close()
			l.cancel()
			close(l.done)
			continue
		}
		s.listeners[l.key] = l
		s.serve(l)
	}
	s.mu.Unlock()
	if draining {
		s.log.Info("config reloaded during shutdown; its new listeners were closed unused", zap.Int("listeners", len(added)))
		return nil
	}
	s.log.Info("config reloaded", zap.Int("listeners_kept", kept), zap.Int("listeners_changed", changed),
		zap.Int("listeners_added", len(added)), zap.Int("listeners_removed", removed),
		zap.Int("secrets_changed", len(changedSecrets)))
	return nil
}

// retire stops a removed listener: no new sessions, and the open ones are
// closed once grace has passed (or at shutdown). s.mu is held.
func (s *Server) retire(l *listener, grace time.Duration) {
	l.ln.Close()
	s.log.Info("listener removed; open sessions close after the grace period",
		zap.String("service", l.name), zap.String("listen", l.addr), zap.Duration("grace", grace))
	s.drainHandler(l.svc, grace)
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		<-l.done
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-t.C:
		case <-s.sessCtx.Done():
		}
		l.cancel()
	}()
}

// drainHandler lets a replaced handler's own connections finish within
// grace, then closes it.
func (s *Server) drainHandler(sv Service, grace time.Duration) {
	if sv.Shutdown == nil {
		return
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		ctx, cancel := context.WithTimeout(s.sessCtx, grace)
		defer cancel()
		_ = sv.Shutdown(ctx)
		_ = sv.Close()
	}()
}

// changedSecrets names the secrets whose new source differs from the
// running one: a different config, a different Vault client, or (static
// and env) different values, such as a rotated password_file.
func (s *Server) changedSecrets(cfg *config.Config, next map[string]credentials.Source) map[string]bool {
	out := make(map[string]bool)
	for name, src := range next {
		old, ok := s.sources[name]
		if !ok {
			continue // new names are simply added
		}
		oldCfg, newCfg := s.cfg.Secrets[name], cfg.Secrets[name]
		switch {
		case !reflect.DeepEqual(oldCfg, newCfg):
			out[name] = true
		case newCfg.Vault != nil:
			if !reflect.DeepEqual(s.cfg.Vault, cfg.Vault) {
				out[name] = true
			}
		default:
			if !sameValues(old, src) {
				out[name] = true
			}
		}
	}
	return out
}

// sameValues compares what two local (static or env) sources serve.
func sameValues(a, b credentials.Source) bool {
	ctx := context.Background() // local sources do no I/O that ctx could bound
	ca, errA := a.Fetch(ctx)
	cb, errB := b.Fetch(ctx)
	if errA != nil || errB != nil {
		return errA == nil && errB == nil
	}
	if len(ca.Fields) != len(cb.Fields) {
		return false
	}
	for k, v := range ca.Fields {
		w, ok := cb.Fields[k]
		if !ok || !v.Equal(w) {
			return false
		}
	}
	return true
}

// ReloadFile loads the config at path and applies it. A config that does
// not load or validate is rejected (logged with every problem, counted in
// config_reloads_total{result="error"}) and the running one keeps serving.
func (s *Server) ReloadFile(path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		s.metrics.configReloads.WithLabelValues("error").Inc()
		for _, line := range config.Lines(err) {
			s.log.Error("config reload rejected; the running config keeps serving", zap.String("config", path), zap.String("problem", line))
		}
		return err
	}
	LogWarnings(s.log, path, cfg)
	return s.Reload(cfg)
}

// Config returns the running config. It never waits for a reload in
// progress, so a SIGTERM can read shutdown_grace at once.
func (s *Server) Config() *config.Config {
	return s.running.Load()
}
