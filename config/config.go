// Package config loads, expands and validates credproxy's YAML configuration.
//
// The key names are the user-facing contract in INTERFACE.md; every field here
// maps to one documented key. Load applies defaults and reports every problem
// it finds, each with its key path.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the whole configuration file.
type Config struct {
	ShutdownGrace Duration          `yaml:"shutdown_grace"`
	Admin         *Admin            `yaml:"admin"`
	Audit         Audit             `yaml:"audit"`
	Secrets       map[string]Secret `yaml:"secrets"`
	Vault         *Vault            `yaml:"vault"`
	Postgres      []Postgres        `yaml:"postgres"`
	HTTP          *HTTP             `yaml:"http"`
	Workloads     *Workloads        `yaml:"workloads"`

	// warnings are what validation accepted but an operator should see.
	warnings []*FieldError
}

// Duration is a time.Duration written as a Go duration string ("90s", "1h").
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Admin is the metrics and probes listener.
type Admin struct {
	Listen string `yaml:"listen"`
}

// Audit configures the audit log.
type Audit struct {
	// Path is a file appended to, or "-" for stdout. Empty disables auditing.
	Path    string `yaml:"path"`
	Queries bool   `yaml:"queries"`
}

// Secret is one named credential source; exactly one of the sources is set.
type Secret struct {
	Static map[string]string `yaml:"static"`
	Env    map[string]string `yaml:"env"`
	Vault  *VaultSecret      `yaml:"vault"`
}

// VaultSecret reads a credential from a Vault path.
type VaultSecret struct {
	Path string `yaml:"path"`
	// FieldMap selects and renames fields: credproxy field -> Vault field.
	FieldMap map[string]string `yaml:"field_map"`
	// KVVersion is 1 or 2 for a KV mount; 0 (default) probes the mount.
	KVVersion int `yaml:"kv_version"`
	// RefreshInterval re-reads a secret without a lease (KV); default 5m.
	RefreshInterval Duration `yaml:"refresh_interval"`
}

// Vault is how credproxy reaches and authenticates to Vault.
type Vault struct {
	Address          string `yaml:"address"`
	CAFile           string `yaml:"ca_file"`
	Namespace        string `yaml:"namespace"`
	RevokeOnShutdown *bool  `yaml:"revoke_on_shutdown"` // default true
	// RevokeUnused revokes a lease once it has been rotated out and its
	// last session ended (default true).
	RevokeUnused *bool `yaml:"revoke_unused"`
	// RequestTimeout bounds one Vault request, and how long a new session
	// waits for a credential when none is cached (default 5s).
	RequestTimeout Duration  `yaml:"request_timeout"`
	Auth           VaultAuth `yaml:"auth"`
}

// VaultAuth selects and configures one Vault auth method.
type VaultAuth struct {
	Method       string `yaml:"method"` // token | approle | kubernetes | jwt
	TokenFile    string `yaml:"token_file"`
	RoleIDFile   string `yaml:"role_id_file"`
	SecretIDFile string `yaml:"secret_id_file"`
	Role         string `yaml:"role"`
	JWTFile      string `yaml:"jwt_file"`
	Mount        string `yaml:"mount"`
}

// Postgres is one upstream database and the listener that fronts it.
type Postgres struct {
	Name        string      `yaml:"name"`
	Listen      string      `yaml:"listen"` // host:port or unix:/path
	Upstream    string      `yaml:"upstream"`
	Database    string      `yaml:"database"`
	Credentials string      `yaml:"credentials"`
	TLS         PostgresTLS `yaml:"tls"`
	ClientTLS   *ClientTLS  `yaml:"client_tls"`
	// SocketMode is the file mode of a unix: listener's socket, in octal
	// (default "0666"): like PostgreSQL's unix_socket_permissions, access is
	// meant to be controlled by the directory the socket is in.
	SocketMode string `yaml:"socket_mode"`
	// StartupTimeout bounds the client side of the handshake (default 10s).
	StartupTimeout Duration `yaml:"startup_timeout"`
	// ConnectTimeout bounds credential fetch, upstream dial, TLS and auth (default 10s).
	ConnectTimeout Duration `yaml:"connect_timeout"`
	// Rotation is how sessions move to a fresh credential when theirs ends.
	Rotation Rotation `yaml:"rotation"`
	// Pool, when set, reuses upstream connections across app sessions
	// (see PostgresPool); absent, every session logs in anew.
	Pool *PostgresPool `yaml:"pool"`
	// MaxSessions bounds the established sessions on this listener; one
	// more is refused after its startup packet with FATAL 53300, as
	// PostgreSQL refuses one over max_connections. 0 (default): derived
	// from the open-file limit (see README).
	MaxSessions int `yaml:"max_sessions"`
	// MaxHandshakes bounds the connections still in their handshake
	// (startup, TLS, credential fetch, upstream login); one more is
	// refused at once, before anything is read, with FATAL 53300. 0
	// (default): derived from the open-file limit.
	MaxHandshakes int `yaml:"max_handshakes"`
	// AllowReplication lets apps open replication connections (the
	// replication startup parameter: physical streaming as pg_basebackup
	// does, logical decoding). Off (default): refused with FATAL 42501,
	// as PostgreSQL refuses a role without REPLICATION.
	AllowReplication bool `yaml:"allow_replication"`
}

// Rotation says when a session moves to a fresh credential.
type Rotation struct {
	// MigrateBefore is how long before its credential ends a session starts
	// moving to a fresh one (at the next idle point between transactions).
	// 0 (default): as soon as credproxy knows the credential will end — a
	// lease at its max TTL, refused or revoked, or a Vault token ending.
	MigrateBefore Duration `yaml:"migrate_before"`
}

// PostgresPool is server-connection reuse for one Postgres service: an
// upstream connection logged in with a credential outlives the app session
// that opened it and, after ResetQuery, serves the next session that has
// the same credential and startup parameters.
type PostgresPool struct {
	// MaxServerConnections bounds the service's upstream connections, idle
	// and in use (default 20). A session that finds none free waits up to
	// WaitTimeout, then gets FATAL 53300.
	MaxServerConnections int `yaml:"max_server_connections"`
	// IdleTimeout closes a connection idle in the pool this long (default 60s).
	IdleTimeout Duration `yaml:"idle_timeout"`
	// MaxLifetime closes a connection this old once it is idle (default 1h).
	MaxLifetime Duration `yaml:"max_lifetime"`
	// ResetQuery is run when a session ends, before the connection goes
	// back to the pool (default "DISCARD ALL").
	ResetQuery string `yaml:"reset_query"`
	// WaitTimeout bounds how long a new session waits for a connection
	// when MaxServerConnections are in use (default: connect_timeout).
	WaitTimeout Duration `yaml:"wait_timeout"`
}

// PostgresTLS is TLS from credproxy to the upstream database.
type PostgresTLS struct {
	Mode       string `yaml:"mode"` // disable | require | verify-ca | verify-full (default)
	CAFile     string `yaml:"ca_file"`
	ServerName string `yaml:"server_name"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
}

// ClientTLS is TLS offered to apps that send SSLRequest.
type ClientTLS struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// Required refuses apps that do not negotiate TLS, as a hostssl line in
	// pg_hba.conf does (FATAL 28000). Default false: libpq's default
	// sslmode (prefer) and apps on loopback or a unix socket keep working.
	Required bool `yaml:"required"`
}

// HTTP is the forward proxy for HTTP_PROXY / HTTPS_PROXY clients.
type HTTP struct {
	Listen         string      `yaml:"listen"`
	CA             HTTPCA      `yaml:"ca"`
	UpstreamCAFile string      `yaml:"upstream_ca_file"`
	Default        string      `yaml:"default"` // deny (default) | tunnel
	Routes         []HTTPRoute `yaml:"routes"`
	// TunnelDeny lists the destinations (CIDRs or single addresses) that
	// default: tunnel never passes through to, checked against the address
	// actually dialed. Absent: DefaultTunnelDeny (loopback, link-local,
	// unspecified); a list given replaces it. credproxy's own listeners are
	// refused whatever the list says.
	TunnelDeny []string `yaml:"tunnel_deny"`
	// MaxConnections bounds the app connections this listener holds open;
	// one more is answered 503 at once and closed. 0 (default): derived
	// from the open-file limit (see README).
	MaxConnections int `yaml:"max_connections"`
	// IdleTimeout closes a kept-alive app connection that sends no next
	// request for this long (default 2m).
	IdleTimeout Duration `yaml:"idle_timeout"`
	// BodyReadTimeout ends a request whose body makes no progress for this
	// long: no byte from the app (default 30s). A body that keeps flowing
	// is never cut, however long it takes.
	BodyReadTimeout Duration `yaml:"body_read_timeout"`

	// AllowNonLoopback accepts a listen address other than loopback. The
	// proxy does not authenticate its clients: whoever can reach the
	// listener can send requests with the routes' credentials.
	AllowNonLoopback bool `yaml:"allow_non_loopback"`
}

// HTTPCA signs interception certificates.
type HTTPCA struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// HTTPRoute injects a credential into requests for one host pattern.
type HTTPRoute struct {
	Host          string `yaml:"host"`
	Credentials   string `yaml:"credentials"`
	Upstream      string `yaml:"upstream"` // https (default) | http
	MaxConcurrent int    `yaml:"max_concurrent"`
	// MaxUpstreamConnections bounds the connections open to the route's
	// upstream, idle ones included; a request that finds none free within
	// the dial timeout gets 503. 0 (default): no bound of its own.
	MaxUpstreamConnections int    `yaml:"max_upstream_connections"`
	Inject                 Inject `yaml:"inject"`
}

// Inject says how a route places the credential; exactly one is set.
type Inject struct {
	Header   *NameValue `yaml:"header"`
	Basic    *Basic     `yaml:"basic"`
	Query    *NameValue `yaml:"query"`
	AWSSigV4 *AWSSigV4  `yaml:"aws_sigv4"`
}

// NameValue is a header or query parameter; Value is a Go template over the secret's fields.
type NameValue struct {
	Name  string `yaml:"name"`
	Value string `yaml:"value"`
}

// Basic is HTTP basic auth; both are Go templates over the secret's fields.
type Basic struct {
	Username string `yaml:"username"`
	Password string `yaml:"password"`
}

// AWSSigV4 signs requests with fields access_key, secret_key and optional session_token.
type AWSSigV4 struct {
	Service string `yaml:"service"`
	Region  string `yaml:"region"`
}

// UnmarshalYAML reads a Go duration string such as "90s" or "1h".
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return errors.New(`must be a duration such as "90s" or "1h"`)
	}
	if strings.TrimSpace(n.Value) == "" {
		*d = 0 // "" means the default, as for any key left out
		return nil
	}
	v, err := time.ParseDuration(strings.TrimSpace(n.Value))
	if err != nil {
		return fmt.Errorf(`invalid duration %q: use a Go duration such as "90s" or "1h"`, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration in the form UnmarshalYAML reads.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

func (d Duration) String() string { return time.Duration(d).String() }

// TLSServerName is the name verified in the upstream's certificate under
// verify-full and sent as SNI: tls.server_name, else the upstream host.
func (p Postgres) TLSServerName() string {
	if p.TLS.ServerName != "" {
		return p.TLS.ServerName
	}
	if host, _, err := net.SplitHostPort(p.Upstream); err == nil {
		return host
	}
	return p.Upstream
}

// ParseDestination reads an http.tunnel_deny entry: a CIDR ("10.0.0.0/8")
// or a single address ("169.254.169.254", "::1"), masked to its prefix.
func ParseDestination(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR such as 169.254.0.0/16 or an address", s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR such as 169.254.0.0/16 or an address", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}
