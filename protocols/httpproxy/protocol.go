package httpproxy

import (
	"context"
	"net"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
)

// Protocol builds the engine's HTTP proxy service from the http: block
// of the config (it is a proxy.Protocol).
type Protocol struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// ProtocolOptions are what a program or a test may set beyond the config.
type ProtocolOptions struct {
	// Dial dials upstream hosts (Options.DialContext); nil uses a
	// net.Dialer. Tests send every host to a local server with it.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// NewProtocol returns the HTTP proxy protocol.
func NewProtocol(o ProtocolOptions) *Protocol {
	return &Protocol{dial: o.Dial}
}

var _ proxy.Protocol = (*Protocol)(nil)

// Listeners is 1 with an http block, else 0.
func (p *Protocol) Listeners(cfg *config.Config) int {
	if cfg.HTTP == nil {
		return 0
	}
	return 1
}

// Check reports every problem of the http block (see check), each
// starting with its key path.
func (p *Protocol) Check(cfg *config.Config) []error {
	if cfg.HTTP == nil {
		return nil
	}
	return check(*cfg.HTTP)
}

// Build makes the proxy for the http block, if there is one: one service
// named "http". http.max_connections left at 0 is env.Share; the
// service's Spec keeps what the file said.
func (p *Protocol) Build(cfg *config.Config, env proxy.Env) ([]proxy.Service, error) {
	hc := cfg.HTTP
	if hc == nil {
		return nil, nil
	}
	eff := *hc
	if eff.MaxConnections == 0 {
		eff.MaxConnections = env.Share
	}
	env.Logger.Debug("connection limits", zap.String("service", serviceName), zap.Int("max_connections", eff.MaxConnections))
	hp, err := New(Options{
		Config:      eff,
		Limits:      env.Limits(serviceName, hc.Listen),
		Credentials: env.Credentials,
		Audit:       env.Audit,
		Logger:      env.Logger.Named("http"),
		Metrics:     env.Metrics,
		DialContext: p.dial,
		OwnAddrs:    env.OwnAddrs,
		Workload:    env.Workload,
	})
	if err != nil {
		return nil, err
	}
	return []proxy.Service{{Name: serviceName, Listen: hc.Listen, Spec: *hc, Handler: hp,
		Files:    []string{hc.CA.CertFile, hc.CA.KeyFile, hc.UpstreamCAFile},
		Shutdown: hp.Shutdown, Close: hp.Close}}, nil
}
