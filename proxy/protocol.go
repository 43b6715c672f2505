package proxy

import (
	"context"
	"net"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
	"github.com/credproxy/credproxy/proxy/limit"
)

// What a protocol plugs into. The engine binds listeners, accepts, keeps
// sessions' goroutines, reloads and shuts down; it knows no protocol. A
// protocol package (protocols/postgres, protocols/httpproxy) exports a
// Protocol that builds Services from the config, and cmd/credproxy hands
// the protocols to New in Options.

// ConnHandler serves one accepted connection; it owns and closes conn.
// It returns once the connection is done, with the session's error (which
// the handler has already reported to the client, audited and logged).
// Cancelling ctx ends the session.
type ConnHandler interface {
	ServeConn(ctx context.Context, conn net.Conn, sessionID string) error
}

// Credentials is what a protocol needs from the credential store: the
// named credential, held until the Handle is released.
type Credentials interface {
	Acquire(ctx context.Context, name string) (*credentials.Handle, error)
}

// Service is one listener's worth of a protocol, built from one config.
type Service struct {
	Name       string // in logs: the postgres service's name, "http"
	Listen     string // "host:port" or "unix:/path"
	SocketMode string // a unix socket's mode, octal; "" for the umask's
	// Spec is the service's settings as the config gave them. A reload
	// that builds a Spec reflect.DeepEqual to the running one keeps the
	// running handler (and releases the new one).
	Spec    any
	Handler ConnHandler
	// Files are the files the service was built from (TLS material, CAs),
	// which `run --watch` watches.
	Files []string
	// Shutdown and Close, when set, end the handler's own connections and
	// goroutines (the HTTP proxy's keep-alive connections and certificate
	// maintenance): Shutdown gracefully, until its ctx ends; Close at once.
	// The engine calls Close for every Service a Build returned, whether
	// it served or not.
	Shutdown func(ctx context.Context) error
	Close    func() error
}

// release frees a handler that will not serve (a rejected or unchanged
// build).
func (sv Service) release() {
	if sv.Close != nil {
		_ = sv.Close()
	}
}

// Env is what the engine gives a protocol to build its services with.
type Env struct {
	// Credentials is the credential store. Handlers may only use it once
	// sessions arrive: on the first build it is created after Build.
	Credentials Credentials
	// Audit is the audit log, wherever a reload moves it.
	Audit audit.Sink
	// Logger is the engine's; a protocol names its own (Named("postgres")).
	Logger *zap.Logger
	// Metrics is where handlers count sessions, refusals and requests.
	Metrics *Metrics
	// Limits returns the counters of the listener a service with this name
	// and listen address binds. The engine keeps them for as long as the
	// address stays bound, so a changed service's new handler counts the
	// connections its old one still holds.
	Limits func(name, listen string) *limit.Listener
	// Share is the process's open-file limit divided among every listener
	// the config has: what a limit left at 0 defaults from.
	Share int
	// Budget counts every app connection of the process against its
	// open-file limit, whatever the services' own limits; a handler
	// refuses one it cannot take a place for.
	Budget *limit.Budget
	// OwnAddrs lists every address credproxy listens on: the admin server
	// and every service, the caller's own listener among them.
	OwnAddrs func() []net.Addr
	// Workload is set when the services are built for one pod's own
	// listeners (DaemonSet mode, workloads): Credentials is then that
	// workload's own store, and handlers admit connections, check what
	// they use and audit through it. Nil otherwise.
	Workload *WorkloadPolicy
}

// Protocol builds the services of one protocol from the config. The
// object lives as long as the program and may keep state across reloads
// (the Postgres cancel registry).
type Protocol interface {
	// Listeners is how many listeners cfg configures for the protocol;
	// Env.Share divides the open-file limit among every protocol's.
	Listeners(cfg *config.Config) int
	// Build makes one Service per listener cfg configures for the
	// protocol, in config order. It binds nothing. On error it releases
	// what it made; the error says which service failed.
	Build(cfg *config.Config, env Env) ([]Service, error)
	// Check reports every problem Build would find in cfg, each error
	// starting with its key path (a *config.FieldError, or an error whose
	// text starts with one). It builds nothing that needs releasing and
	// contacts nothing: `credproxy validate` runs it.
	Check(cfg *config.Config) []error
}

// Options are what cmd/credproxy and tests give New beyond the config.
type Options struct {
	// Protocols build the services. Their order is the order of Addrs and
	// of Check's problems.
	Protocols []Protocol
}
