package proxy

import (
	"context"
	"fmt"
	"reflect"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
	"github.com/credproxy/credproxy/proxy/limit"
)

// built is everything made from one config before any of it is used, so a
// config that fails half-way changes nothing.
type built struct {
	cfg      *config.Config
	vault    *credentials.VaultClient // the client to use (new or kept)
	newVault bool
	sources  map[string]credentials.Source
	audit    audit.Sink
	writer   *audit.Writer // a newly opened audit file, if any
	svcs     []Service
	share    int      // Env.Share
	files    []string // DaemonSet mode: the services' files
}

// build makes the parts of cfg that can fail. Parts whose settings did not
// change from the running config are reused (the Vault client, the audit
// file).
func (s *Server) build(cfg *config.Config) (b *built, err error) {
	b = &built{cfg: cfg}
	defer func() {
		if err != nil {
			b.discard()
		}
	}()
	old := s.cfg
	switch {
	case cfg.Vault == nil, cfg.Workloads != nil:
		// In DaemonSet mode credproxy logs in as each workload, never as
		// itself, and serves no credential of its own.
	case old != nil && reflect.DeepEqual(old.Vault, cfg.Vault) && s.vault != nil:
		b.vault = s.vault
	default:
		if b.vault, err = credentials.NewVaultClient(*cfg.Vault, s.log); err != nil {
			return b, err
		}
		b.newVault = true
	}
	if cfg.Workloads != nil {
		b.sources = map[string]credentials.Source{}
	} else if b.sources, err = BuildSources(cfg.Secrets, b.vault); err != nil {
		return b, err
	}

	switch {
	case cfg.Audit.Path == "":
		b.audit = audit.Discard{}
	case old != nil && old.Audit.Path == cfg.Audit.Path:
		b.audit = s.audit.current()
	default:
		alog := s.log.Named("audit")
		if b.writer, err = audit.Open(cfg.Audit.Path, func(err error) { alog.Error("audit write failed", zap.Error(err)) }); err != nil {
			return b, err
		}
		b.audit = b.writer
	}

	listeners := 0
	for _, p := range s.protocols {
		listeners += p.Listeners(cfg)
	}
	env := Env{
		Credentials: lazyStore{s},
		Audit:       s.audit,
		Logger:      s.log,
		Metrics:     s.metrics,
		Limits:      func(name, listen string) *limit.Listener { return s.limitsFor(svcKey(name, listen)) },
		Share:       limit.Share(limit.OpenFileLimit(), listeners),
		Budget:      s.budget,
		OwnAddrs:    s.ownAddrs,
	}
	b.share = env.Share
	for _, p := range s.protocols {
		svcs, err := p.Build(cfg, env)
		if err != nil {
			return b, err
		}
		b.svcs = append(b.svcs, svcs...)
	}
	if cfg.Workloads != nil {
		// Each pod gets the services on listeners of its own
		// (workloads.go); these were built to check the config.
		for _, sv := range b.svcs {
			b.files = append(b.files, sv.Files...)
			sv.release()
		}
		b.svcs = nil
	}
	return b, nil
}

// discard releases what a rejected build opened.
func (b *built) discard() {
	for _, sv := range b.svcs {
		sv.release()
	}
	if b.newVault && b.vault != nil {
		b.vault.Close()
	}
	if b.writer != nil {
		_ = b.writer.Close()
	}
}

// commit makes b the running config's parts (not its listeners).
func (s *Server) commit(b *built) {
	s.cfg, s.sources, s.share = b.cfg, b.sources, b.share
	s.running.Store(b.cfg)
	s.mu.Lock() // Addrs reads it without reloadMu
	s.svcs, s.files = b.svcs, b.files
	s.mu.Unlock()
	for _, sv := range b.svcs {
		if sv.Close != nil {
			s.closers = append(s.closers, sv.Close)
		}
	}
	if b.newVault {
		s.vaults = append(s.vaults, b.vault)
	}
	s.mu.Lock() // notReady reads it without reloadMu
	s.vault = b.vault
	s.mu.Unlock()
	if b.writer != nil {
		s.audits = append(s.audits, b.writer)
	}
	s.audit.set(b.audit)
}

// lazyStore hands handlers the store, which New creates after the first
// build: the handlers only use it once sessions arrive.
type lazyStore struct{ s *Server }

func (l lazyStore) Acquire(ctx context.Context, name string) (*credentials.Handle, error) {
	return l.s.store.Acquire(ctx, name)
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

// limitsFor returns the counters of the listener at key (Env.Limits),
// kept across reloads so a changed service's new handler counts the
// connections its old one still holds. reloadMu is held: protocols call
// it from Build.
func (s *Server) limitsFor(key string) *limit.Listener {
	if l, ok := s.limits[key]; ok {
		return l
	}
	l := &limit.Listener{}
	s.limits[key] = l
	return l
}
