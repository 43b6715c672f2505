package postgres

import (
	"fmt"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/limit"
)

// Protocol builds the engine's Postgres services, one per entry under
// postgres: in the config (it is a proxy.Protocol). It owns the cancel
// registry every service shares, for as long as the program runs: an app
// may send its cancel request to any listener, and a reload must not void
// the keys that open sessions were given.
type Protocol struct {
	cancels *CancelRegistry
}

// NewProtocol returns the Postgres protocol with an empty cancel registry.
func NewProtocol() *Protocol {
	return &Protocol{cancels: NewCancelRegistry()}
}

var _ proxy.Protocol = (*Protocol)(nil)

// Listeners is the number of postgres services.
func (p *Protocol) Listeners(cfg *config.Config) int { return len(cfg.Postgres) }

// Check loads every service's TLS material as Build does and reports each
// failure under the service's key path, postgres[i].
func (p *Protocol) Check(cfg *config.Config) []error {
	var errs []error
	for i, pc := range cfg.Postgres {
		if _, err := NewHandler(Options{Service: pc}); err != nil {
			errs = append(errs, &config.FieldError{Path: fmt.Sprintf("postgres[%d]", i), Msg: err.Error()})
		}
	}
	return errs
}

// Build makes one handler per postgres service. A limit left at 0 is
// derived from env.Share (limit.PostgresDefaults); the service's Spec
// keeps what the file said, so that a reload compares settings, not
// derived numbers.
func (p *Protocol) Build(cfg *config.Config, env proxy.Env) ([]proxy.Service, error) {
	svcs := make([]proxy.Service, 0, len(cfg.Postgres))
	for _, pc := range cfg.Postgres {
		eff := pc
		defSessions, defHandshakes := limit.PostgresDefaults(env.Share)
		if eff.MaxSessions == 0 {
			eff.MaxSessions = defSessions
		}
		if eff.MaxHandshakes == 0 {
			eff.MaxHandshakes = defHandshakes
		}
		env.Logger.Debug("connection limits", zap.String("service", pc.Name),
			zap.Int("max_sessions", eff.MaxSessions), zap.Int("max_handshakes", eff.MaxHandshakes))
		if b := env.Budget.Max(); b > 0 && eff.MaxSessions+eff.MaxHandshakes > b {
			env.Logger.Warn("connection limits exceed the open-file budget; connections over it are refused with 53300",
				zap.String("service", pc.Name), zap.Int("max_sessions", eff.MaxSessions), zap.Int("max_handshakes", eff.MaxHandshakes),
				zap.Int("budget", b), zap.Int("open_file_limit", limit.OpenFileLimit()))
		}
		h, err := NewHandler(Options{
			Service:      eff,
			Limits:       env.Limits(pc.Name, pc.Listen),
			Budget:       env.Budget,
			Credentials:  env.Credentials,
			Audit:        env.Audit,
			AuditQueries: cfg.Audit.Queries,
			Cancels:      p.cancels,
			Logger:       env.Logger.Named("postgres").With(zap.String("service", pc.Name)),
			Metrics:      env.Metrics,
			Workload:     env.Workload,
		})
		if err != nil {
			return nil, err
		}
		spec := struct {
			config.Postgres
			AuditQueries bool
		}{pc, cfg.Audit.Queries}
		files := []string{pc.TLS.CAFile, pc.TLS.CertFile, pc.TLS.KeyFile}
		if ct := pc.ClientTLS; ct != nil {
			files = append(files, ct.CertFile, ct.KeyFile)
		}
		sv := proxy.Service{Name: pc.Name, Listen: pc.Listen, SocketMode: pc.SocketMode,
			Spec: spec, Handler: h, Files: files}
		if h.pool != nil {
			// The pool's idle upstream connections are the handler's own.
			sv.Shutdown, sv.Close = h.Shutdown, h.Close
		}
		svcs = append(svcs, sv)
	}
	return svcs, nil
}
