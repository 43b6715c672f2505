package config

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"
)

// Defaults from INTERFACE.md.
const (
	DefaultShutdownGrace  = 30 * time.Second
	DefaultTLSMode        = "verify-full"
	DefaultStartupTimeout = 10 * time.Second
	DefaultConnectTimeout = 10 * time.Second
	DefaultPostgresPort   = "5432"
	DefaultKubernetesJWT  = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	DefaultHTTPDefault    = "deny"
	DefaultRouteUpstream  = "https"

	DefaultHTTPIdleTimeout     = 2 * time.Minute
	DefaultHTTPBodyReadTimeout = 30 * time.Second

	DefaultSocketMode          = "0666"
	DefaultVaultRequestTimeout = 5 * time.Second
	DefaultKVRefreshInterval   = 5 * time.Minute

	DefaultPoolMaxServerConnections = 20
	DefaultPoolIdleTimeout          = 60 * time.Second
	DefaultPoolMaxLifetime          = time.Hour
	DefaultPoolResetQuery           = "DISCARD ALL"
)

// DefaultTunnelDeny is http.tunnel_deny when the file gives none: loopback,
// link-local (cloud metadata at 169.254.169.254 among them) and the
// unspecified addresses, which reach the host itself.
var DefaultTunnelDeny = []string{
	"127.0.0.0/8", "::1/128",
	"169.254.0.0/16", "fe80::/10",
	"0.0.0.0/8", "::/128",
}

// applyDefaults fills unset keys. present holds the key paths the file gave
// a value, so an explicit zero (shutdown_grace: 0s) is kept, not defaulted.
func (c *Config) applyDefaults(present map[string]bool) {
	if !present["shutdown_grace"] {
		c.ShutdownGrace = Duration(DefaultShutdownGrace)
	}
	if v := c.Vault; v != nil {
		if v.RevokeOnShutdown == nil {
			t := true
			v.RevokeOnShutdown = &t
		}
		if v.RevokeUnused == nil {
			t := true
			v.RevokeUnused = &t
		}
		if !present["vault.request_timeout"] {
			v.RequestTimeout = Duration(DefaultVaultRequestTimeout)
		}
		if v.Auth.Mount == "" {
			switch v.Auth.Method {
			case "approle", "kubernetes", "jwt":
				v.Auth.Mount = v.Auth.Method
			}
		}
		if v.Auth.Method == "kubernetes" && v.Auth.JWTFile == "" {
			v.Auth.JWTFile = DefaultKubernetesJWT
		}
	}
	for name, sec := range c.Secrets {
		if sec.Vault != nil && !present["secrets."+name+".vault.refresh_interval"] {
			sec.Vault.RefreshInterval = Duration(DefaultKVRefreshInterval)
		}
	}
	c.applyWorkloadDefaults()
	for i := range c.Postgres {
		p := &c.Postgres[i]
		path := fmt.Sprintf("postgres[%d]", i)
		if p.TLS.Mode == "" {
			p.TLS.Mode = DefaultTLSMode
		}
		if !present[path+".startup_timeout"] {
			p.StartupTimeout = Duration(DefaultStartupTimeout)
		}
		if !present[path+".connect_timeout"] {
			p.ConnectTimeout = Duration(DefaultConnectTimeout)
		}
		p.Upstream = withDefaultPort(p.Upstream, DefaultPostgresPort)
		if pl := p.Pool; pl != nil {
			if !present[path+".pool.max_server_connections"] {
				pl.MaxServerConnections = DefaultPoolMaxServerConnections
			}
			if !present[path+".pool.idle_timeout"] {
				pl.IdleTimeout = Duration(DefaultPoolIdleTimeout)
			}
			if !present[path+".pool.max_lifetime"] {
				pl.MaxLifetime = Duration(DefaultPoolMaxLifetime)
			}
			if !present[path+".pool.reset_query"] {
				pl.ResetQuery = DefaultPoolResetQuery
			}
			if !present[path+".pool.wait_timeout"] {
				pl.WaitTimeout = p.ConnectTimeout
			}
		}
		if p.SocketMode == "" && strings.HasPrefix(p.Listen, "unix:") {
			p.SocketMode = DefaultSocketMode
		}
		// INTERFACE.md's sample writes client_tls with both files empty; that
		// means no client TLS, the same as leaving client_tls out.
		if ct := p.ClientTLS; ct != nil && ct.CertFile == "" && ct.KeyFile == "" && !ct.Required {
			p.ClientTLS = nil
		}
	}
	if h := c.HTTP; h != nil {
		if h.Default == "" {
			h.Default = DefaultHTTPDefault
		}
		if !present["http.tunnel_deny"] {
			h.TunnelDeny = append([]string(nil), DefaultTunnelDeny...)
		}
		if !present["http.idle_timeout"] {
			h.IdleTimeout = Duration(DefaultHTTPIdleTimeout)
		}
		if !present["http.body_read_timeout"] {
			h.BodyReadTimeout = Duration(DefaultHTTPBodyReadTimeout)
		}
		for i := range h.Routes {
			if h.Routes[i].Upstream == "" {
				h.Routes[i].Upstream = DefaultRouteUpstream
			}
		}
	}
}

// withDefaultPort appends port to an address that has none: "db" becomes
// "db:5432", "::1" and "[::1]" become "[::1]:5432". Anything else is returned
// unchanged for validation to judge.
func withDefaultPort(addr, port string) string {
	if addr == "" {
		return addr
	}
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	host := strings.TrimSuffix(strings.TrimPrefix(addr, "["), "]")
	if net.ParseIP(host) != nil || !strings.Contains(addr, ":") {
		return net.JoinHostPort(host, port)
	}
	return addr
}

// resolvePaths makes every relative file path absolute against baseDir.
func (c *Config) resolvePaths(baseDir string) {
	if baseDir == "" {
		return
	}
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(baseDir, *p)
		}
	}
	if c.Audit.Path != "-" {
		abs(&c.Audit.Path)
	}
	for _, s := range c.Secrets {
		for k, v := range s.Static {
			if strings.HasSuffix(k, "_file") {
				abs(&v)
				s.Static[k] = v
			}
		}
	}
	if v := c.Vault; v != nil {
		abs(&v.CAFile)
		abs(&v.Auth.TokenFile)
		abs(&v.Auth.RoleIDFile)
		abs(&v.Auth.SecretIDFile)
		abs(&v.Auth.JWTFile)
	}
	for i := range c.Postgres {
		p := &c.Postgres[i]
		abs(&p.TLS.CAFile)
		abs(&p.TLS.CertFile)
		abs(&p.TLS.KeyFile)
		if p.ClientTLS != nil {
			abs(&p.ClientTLS.CertFile)
			abs(&p.ClientTLS.KeyFile)
		}
	}
	if h := c.HTTP; h != nil {
		abs(&h.CA.CertFile)
		abs(&h.CA.KeyFile)
		abs(&h.UpstreamCAFile)
	}
}
