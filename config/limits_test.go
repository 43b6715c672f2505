package config

import (
	"slices"
	"testing"
	"time"
)

func TestLimitKeys(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{name: "limits set", src: appSecret + pg("max_sessions: 100", "max_handshakes: 10") + httpBlock +
			"  max_connections: 500\n  idle_timeout: 1m\n  body_read_timeout: 5s\n" +
			"  tunnel_deny: [10.0.0.0/8, 169.254.169.254, \"fd00::/8\"]\n"},
		{name: "negative limits", src: appSecret + pg("max_sessions: -1", "max_handshakes: -2") + httpBlock +
			"  max_connections: -3\n", want: []string{
			"postgres[0].max_sessions: must not be negative",
			"postgres[0].max_handshakes: must not be negative",
			"http.max_connections: must not be negative",
		}},
		{name: "zero timeouts", src: appSecret + httpBlock + "  idle_timeout: 0s\n  body_read_timeout: 0s\n", want: []string{
			"http.idle_timeout: must be greater than 0",
			"http.body_read_timeout: must be greater than 0",
		}},
		{name: "bad deny entries", src: appSecret + httpBlock + "  tunnel_deny: [10.0.0.0/33, localhost, \"fe80::1%eth0\"]\n", want: []string{
			"http.tunnel_deny[0]:", "http.tunnel_deny[1]:", "http.tunnel_deny[2]:",
		}},
		{name: "route bound", src: appSecret + route("host: api.example.com", "credentials: app",
			"max_upstream_connections: -1", "inject: {header: {name: X-Key, value: \"{{ .password }}\"}}"),
			want: []string{"http.routes[0].max_upstream_connections: must not be negative"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, got := parseLines(t, fixture(t), tt.src)
			checkLines(t, got, tt.want)
		})
	}
}

func TestLimitDefaults(t *testing.T) {
	cfg, lines := parseLines(t, fixture(t), appSecret+pg()+httpBlock)
	if len(lines) > 0 {
		t.Fatal(lines)
	}
	h := cfg.HTTP
	if !slices.Equal(h.TunnelDeny, DefaultTunnelDeny) || h.IdleTimeout.D() != 2*time.Minute || h.BodyReadTimeout.D() != 30*time.Second {
		t.Errorf("http defaults: %+v", h)
	}
	if h.MaxConnections != 0 || cfg.Postgres[0].MaxSessions != 0 || cfg.Postgres[0].MaxHandshakes != 0 {
		t.Error("connection limits default to 0 (derived at run time)")
	}
	// An empty list replaces the default: nothing is denied but credproxy itself.
	cfg, lines = parseLines(t, fixture(t), appSecret+httpBlock+"  tunnel_deny: []\n")
	if len(lines) > 0 {
		t.Fatal(lines)
	}
	if cfg.HTTP.TunnelDeny == nil || len(cfg.HTTP.TunnelDeny) != 0 {
		t.Errorf("tunnel_deny: [] became %v", cfg.HTTP.TunnelDeny)
	}
}
