package vaulttest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Options configures Start. The zero value is a dev-mode server.
type Options struct {
	// RootToken is the root token's ID, like -dev-root-token-id; empty
	// means a random "hvs." token.
	RootToken string
	// DefaultLeaseTTL and MaxLeaseTTL are the system-wide lease TTLs that
	// apply where a mount or role sets none; 0 means 768h, Vault's default.
	DefaultLeaseTTL time.Duration
	MaxLeaseTTL     time.Duration
	// NoDefaultMounts leaves out the kv-v2 engine at secret/ that
	// `vault server -dev` mounts.
	NoDefaultMounts bool
	// RevokeRetryBase is the base of the exponential backoff between
	// attempts to revoke an expired lease whose revocation failed; 0 means
	// 10s, Vault's. After six failures the lease is left irrevocable.
	RevokeRetryBase time.Duration
	// Version is what sys/health reports; empty means "1.21.0".
	Version string
}

const (
	defaultSystemTTL  = 768 * time.Hour // 32 days: Vault's default and max lease TTL
	maxRevokeAttempts = 6
	revokeTimeout     = 30 * time.Second
	maxRequestSize    = 32 << 20 // Vault's DefaultMaxRequestSize
)

// Server is a running fake Vault started by Start and closed by the test's
// Cleanup. All its methods are safe for concurrent use.
type Server struct {
	opts        Options
	addr        string
	rootToken   string
	clusterName string
	clusterID   string
	logf        func(format string, args ...any)

	// life guards the listener: running is false between Stop and
	// Restart, closed after Close.
	life    sync.Mutex
	httpSrv *http.Server
	running bool
	closed  bool
	serveWG sync.WaitGroup // Serve goroutines

	// gate admits requests only while the server runs, so that Stop can
	// wait for those in flight without racing new ones.
	gate      sync.Mutex
	accepting bool
	handling  sync.WaitGroup

	quit       chan struct{}   // closed by Close: stops the expiry loop
	baseCtx    context.Context // canceled by Close: ends background work
	baseCancel context.CancelFunc
	wake       chan struct{} // nudges the expiry loop
	loopWG     sync.WaitGroup

	// mu guards the state below. It is never held across SQL or file I/O.
	mu       sync.Mutex
	mounts   map[string]*mount // by path with trailing slash: "secret/", "auth/approle/"
	tokens   map[string]*token // by ID
	byAcc    map[string]*token // by accessor
	leases   map[string]*lease // by lease ID
	policies map[string]*policy
	audits   map[string]*auditDevice
	counts   map[string]int
	paused   bool // Stop pauses lease expiry
}

// Start starts a server on 127.0.0.1 with a free port and registers a
// Cleanup that closes it. It must be called from the test's goroutine.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.DefaultLeaseTTL <= 0 {
		opts.DefaultLeaseTTL = defaultSystemTTL
	}
	if opts.MaxLeaseTTL <= 0 {
		opts.MaxLeaseTTL = defaultSystemTTL
	}
	if opts.DefaultLeaseTTL > opts.MaxLeaseTTL {
		opts.DefaultLeaseTTL = opts.MaxLeaseTTL
	}
	if opts.RevokeRetryBase <= 0 {
		opts.RevokeRetryBase = 10 * time.Second
	}
	if opts.Version == "" {
		opts.Version = "1.21.0"
	}
	s := &Server{
		opts:        opts,
		rootToken:   opts.RootToken,
		clusterName: "vault-cluster-" + randomHex(8),
		clusterID:   newUUID(),
		logf:        t.Logf,
		quit:        make(chan struct{}),
		wake:        make(chan struct{}, 1),
		mounts:      map[string]*mount{},
		tokens:      map[string]*token{},
		byAcc:       map[string]*token{},
		leases:      map[string]*lease{},
		policies:    map[string]*policy{},
		audits:      map[string]*auditDevice{},
		counts:      map[string]int{},
	}
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	if s.rootToken == "" {
		s.rootToken = "hvs." + base62(24)
	}
	s.bootstrap()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("vaulttest: listen: %v", err)
	}
	s.addr = ln.Addr().String()
	s.serve(ln)
	s.loopWG.Add(1)
	go s.expireLoop()
	t.Cleanup(s.Close)
	return s
}

// bootstrap creates what a fresh dev server has: the sys and token mounts,
// the default policy, the root token and, unless disabled, secret/ (kv v2).
func (s *Server) bootstrap() {
	s.mounts["sys/"] = newMount("sys/", "system", "system endpoints used for control, policy and debugging", nil, s.sysBackend())
	s.mounts["auth/token/"] = newMount("auth/token/", "token", "token based credentials", nil, s.tokenBackend())
	if !s.opts.NoDefaultMounts {
		s.mounts["secret/"] = newMount("secret/", "kv", "key/value secret storage", map[string]string{"version": "2"}, newKVv2())
	}
	p, err := parsePolicy("default", defaultPolicyText)
	if err != nil {
		panic(fmt.Sprintf("vaulttest: built-in default policy: %v", err))
	}
	s.policies["default"] = p
	root := &token{
		id:           s.rootToken,
		accessor:     base62(24),
		policies:     []string{"root"},
		path:         "auth/token/root",
		displayName:  "root",
		creationTime: time.Now(),
		mount:        s.mounts["auth/token/"],
		noLease:      true,
	}
	s.tokens[root.id] = root
	s.byAcc[root.accessor] = root
}

// serve starts an http.Server on ln.
func (s *Server) serve(ln net.Listener) {
	srv := &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTP),
		ReadHeaderTimeout: 10 * time.Second,
	}
	s.httpSrv = srv
	s.running = true
	s.gate.Lock()
	s.accepting = true
	s.gate.Unlock()
	s.serveWG.Add(1)
	go func() {
		defer s.serveWG.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.logf("vaulttest: serve: %v", err)
		}
	}()
}

// Addr returns the listener's address, "127.0.0.1:port". It stays the same
// across Stop and Restart.
func (s *Server) Addr() string { return s.addr }

// URL returns the server's base URL, for VAULT_ADDR.
func (s *Server) URL() string { return "http://" + s.addr }

// RootToken returns the root token's ID.
func (s *Server) RootToken() string { return s.rootToken }

// Client returns a vault/api client for the server, holding the root token,
// with retries off so that tests see every failure.
func (s *Server) Client(t testing.TB) *vault.Client {
	t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = s.URL()
	cfg.MaxRetries = 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatalf("vaulttest: client: %v", err)
	}
	c.SetToken(s.rootToken)
	return c
}

// Count returns how many HTTP requests the server has received for a
// logical path (the URL path without /v1/ and the query), e.g.
// Count("database/creds/app").
func (s *Server) Count(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[strings.TrimPrefix(path, "/v1/")]
}

// Leases returns the IDs of the leases currently held under prefix (all
// leases for ""), sorted. Irrevocable leases are included.
func (s *Server) Leases(prefix string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id := range s.leases {
		if strings.HasPrefix(id, prefix) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

// Stop takes the server down as if Vault had died: the listener and every
// open connection are closed, so clients get "connection refused", and
// leases stop expiring. State is kept for Restart. Stop waits for requests
// in flight to end. It is a no-op when stopped or closed.
func (s *Server) Stop() {
	s.life.Lock()
	defer s.life.Unlock()
	s.stopLocked()
}

func (s *Server) stopLocked() {
	if !s.running {
		return
	}
	s.running = false
	s.mu.Lock()
	s.paused = true
	s.mu.Unlock()
	s.gate.Lock()
	s.accepting = false
	s.gate.Unlock()
	s.httpSrv.Close() // closes the listener and all connections
	s.serveWG.Wait()
	s.handling.Wait()
}

// Restart brings a stopped server back on the same address with the same
// state (stopping it first if it runs). Leases that expired meanwhile are
// revoked at once, as Vault does when it restores leases on start.
func (s *Server) Restart() error {
	s.life.Lock()
	defer s.life.Unlock()
	if s.closed {
		return errors.New("vaulttest: restart after Close")
	}
	s.stopLocked()
	var ln net.Listener
	var err error
	for attempt := 0; attempt < 50; attempt++ { // the old socket may linger briefly
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("vaulttest: restart on %s: %w", s.addr, err)
	}
	s.serve(ln)
	s.mu.Lock()
	s.paused = false
	s.mu.Unlock()
	s.nudge()
	return nil
}

// Close stops the server for good: the listener, connections, expiry loop,
// database connections and audit files. Leases are not revoked. Close is
// idempotent and waits for everything it started.
func (s *Server) Close() {
	s.life.Lock()
	defer s.life.Unlock()
	if s.closed {
		return
	}
	s.stopLocked()
	s.closed = true
	close(s.quit)
	s.baseCancel()
	s.loopWG.Wait()

	s.mu.Lock()
	mounts := make([]*mount, 0, len(s.mounts))
	for _, m := range s.mounts {
		mounts = append(mounts, m)
	}
	audits := make([]*auditDevice, 0, len(s.audits))
	for _, a := range s.audits {
		audits = append(audits, a)
	}
	s.mu.Unlock()
	for _, m := range mounts {
		if c, ok := m.be.(interface{ close() }); ok {
			c.close()
		}
	}
	for _, a := range audits {
		a.close()
	}
}

// nudge wakes the expiry loop to look at leases and tokens again.
func (s *Server) nudge() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// backgroundContext is the context of work not tied to one request, such
// as expiry: it ends with Close.
func (s *Server) backgroundContext(timeout time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.baseCtx, timeout)
}
