// Package pgtest runs throwaway PostgreSQL servers for integration tests: one
// initdb cluster per Start, in its own temp dir, listening on a free loopback
// port, with one login role per client authentication method and optional TLS.
//
// Missing PostgreSQL binaries fail the test rather than skip it: a suite that
// silently skips its integration tests looks green while testing nothing.
// scripts/pgenv.sh installs them.
package pgtest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Roles created by Start, and the database they share.
const (
	Superuser    = "postgres"      // hba scram-sha-256 over TCP, trust on the unix socket
	ScramUser    = "scram_user"    // hba scram-sha-256, SCRAM verifier stored
	MD5User      = "md5_user"      // hba md5, md5 hash stored
	PasswordUser = "password_user" // hba password (cleartext on the wire)
	TrustUser    = "trust_user"    // hba trust
	CertUser     = "cert_user"     // hba cert, hostssl only; needs Options.TLS
	AppDB        = "app"           // owned by ScramUser, every role may create tables in it
)

// roles lists the non-superuser roles with the hba method each is given.
var roles = []struct{ name, method string }{
	{ScramUser, "scram-sha-256"},
	{MD5User, "md5"},
	{PasswordUser, "password"},
	{TrustUser, "trust"},
	{CertUser, "cert"},
}

const (
	defaultMaxConnections = 300 // room for connection-storm tests
	startAttempts         = 3   // FreePort can race with other listeners
	initdbTimeout         = 2 * time.Minute
	readyTimeout          = time.Minute
	execTimeout           = time.Minute
	certValidity          = 7 * 24 * time.Hour
)

// Options configures Start. The zero value is a plain-TCP server.
type Options struct {
	// TLS turns on ssl with a server certificate for localhost and
	// 127.0.0.1 signed by a per-server test CA, and adds the hostssl cert
	// line for CertUser.
	TLS bool
	// MaxConnections is postgres' max_connections; 0 means 300.
	MaxConnections int
	// HBA, if set, replaces the generated TCP lines of pg_hba.conf. The
	// unix-socket trust line for the superuser is always kept first, as
	// Start and Exec administer the server through it.
	HBA []string
	// SuperuserPassword is the password of the postgres role; empty means random.
	SuperuserPassword string
}

// Server is a running PostgreSQL started by Start and stopped by the
// test's Cleanup. Its fields are read-only.
type Server struct {
	Host      string // always 127.0.0.1
	Port      int
	DataDir   string
	SocketDir string // unix_socket_directories; the superuser is trusted there
	BinDir    string
	LogFile   string // server stderr, shared by all start attempts

	// Set only with Options.TLS.
	CAFile      string // PEM of the CA that signed the server certificate
	CAPEM       []byte
	OtherCAFile string // PEM of an unrelated CA, for verification-failure tests

	dir       string
	cred      *syscall.Credential // whom postgres runs as; nil means ourselves
	passwords map[string]string
	ca        *authority
	proc      *process
}

// BinDir returns the directory holding initdb and postgres: $PG_BINDIR if
// set, else the highest /usr/lib/postgresql/*/bin, else initdb's directory
// on PATH. It fails the test when none has them.
func BinDir(t testing.TB) string {
	t.Helper()
	dir, err := findBinDir()
	if err != nil {
		t.Fatalf("pgtest: %v; run scripts/pgenv.sh to install PostgreSQL, and set PG_BINDIR to the directory it prints", err)
	}
	return dir
}

func findBinDir() (string, error) {
	if dir := os.Getenv("PG_BINDIR"); dir != "" {
		if !hasServerBinaries(dir) {
			return "", fmt.Errorf("PG_BINDIR=%s has no initdb and postgres", dir)
		}
		return dir, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	best, bestVersion := "", -1.0
	for _, dir := range dirs {
		v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
		if err == nil && v > bestVersion && hasServerBinaries(dir) {
			best, bestVersion = dir, v
		}
	}
	if best != "" {
		return best, nil
	}
	if p, err := exec.LookPath("initdb"); err == nil && hasServerBinaries(filepath.Dir(p)) {
		return filepath.Dir(p), nil
	}
	return "", errors.New("PostgreSQL server binaries (initdb, postgres) not found in $PG_BINDIR, /usr/lib/postgresql/*/bin or $PATH")
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "postgres"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// FreePort returns a loopback TCP port that was free a moment ago. Another
// process may take it before the caller binds it, so callers retry.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pgtest: find free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// makeDataDir makes the directory a cluster lives in: under /dev/shm when
// there is one. On disk, a busy machine's writeback (other tests'
// clusters, the Go build cache) stalls WAL writes, and with them commits
// and logins, for seconds at a time; nothing here outlives the test.
func makeDataDir() (string, error) {
	if dir, err := os.MkdirTemp("/dev/shm", "pgtest-"); err == nil {
		return dir, nil
	}
	return os.MkdirTemp("", "pgtest-")
}

// Start initializes and starts a server, creates the roles and AppDB, and
// registers a Cleanup that stops the server and removes its files. It must
// be called from the test's goroutine.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	binDir := BinDir(t)
	cred, err := serverCredential()
	if err != nil {
		t.Fatalf("pgtest: %v; scripts/pgenv.sh installs PostgreSQL, which creates that user", err)
	}
	// Not t.TempDir: its parents are 0700 and ours, which the postgres user
	// could not traverse when we are root.
	dir, err := makeDataDir()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("pgtest: remove %s: %v", dir, err)
		}
	})
	s := &Server{
		Host:      "127.0.0.1",
		DataDir:   filepath.Join(dir, "data"),
		SocketDir: filepath.Join(dir, "sock"),
		BinDir:    binDir,
		LogFile:   filepath.Join(dir, "postgres.log"),
		dir:       dir,
		cred:      cred,
		passwords: map[string]string{Superuser: opts.SuperuserPassword},
	}
	if s.passwords[Superuser] == "" {
		s.passwords[Superuser] = randomHex()
	}
	for _, r := range roles {
		s.passwords[r.name] = randomHex()
	}
	// World-traversable so that clients running as other users can reach
	// the socket and the CA; the data dir itself stays 0700.
	if err := s.mkdirOwned(dir); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if err := s.mkdirOwned(s.SocketDir); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if err := s.initdb(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if err := s.configure(opts); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() { s.stop(t) })
	s.start(t)
	if err := s.bootstrap(); err != nil {
		t.Fatalf("pgtest: create roles: %v\n%s", err, s.logTailSection())
	}
	return s
}

// serverCredential returns whom to run PostgreSQL as: the postgres system
// user when we are root, as postgres refuses to run as root, else nil
// (ourselves).
func serverCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs a postgres system user to run the server as: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("postgres uid %q: %w", u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("postgres gid %q: %w", u.Gid, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (s *Server) mkdirOwned(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o755); err != nil { // MkdirTemp makes 0700
		return err
	}
	return s.chown(dir)
}

// chown gives path to the user postgres runs as, so that it can read what
// we wrote as root.
func (s *Server) chown(path string) error {
	if s.cred == nil {
		return nil
	}
	return os.Chown(path, int(s.cred.Uid), int(s.cred.Gid))
}

func (s *Server) writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.WriteFile(path, data, mode); err != nil {
		return err
	}
	return s.chown(path)
}

// command runs a PostgreSQL binary as the server user, from a directory that
// user can read (our working directory may not be).
func (s *Server) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(s.BinDir, name), args...)
	cmd.Dir = s.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	return cmd
}

func (s *Server) initdb() error {
	ctx, cancel := context.WithTimeout(context.Background(), initdbTimeout)
	defer cancel()
	// --no-sync: nothing here needs to survive a crash, and fsync dominates
	// initdb's run time. The trust default is replaced by our pg_hba.conf.
	out, err := s.command(ctx, "initdb", "-D", s.DataDir, "-U", Superuser, "--auth=trust",
		"--encoding=UTF8", "--locale=C", "--no-sync").CombinedOutput()
	if err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out)
	}
	return nil
}

// configure appends our settings to postgresql.conf and writes pg_hba.conf
// and, with TLS, the certificates.
func (s *Server) configure(opts Options) error {
	maxConns := opts.MaxConnections
	if maxConns == 0 {
		maxConns = defaultMaxConnections
	}
	var conf strings.Builder
	fmt.Fprintf(&conf, `
# pgtest: a disposable server, so durability is traded for speed.
listen_addresses = '127.0.0.1'
unix_socket_directories = %s
max_connections = %d
shared_buffers = '32MB'
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
log_connections = on
log_line_prefix = '%%m [%%p] %%q%%u@%%d '
`, quoteLiteral(s.SocketDir), maxConns)

	if opts.TLS {
		if err := s.writeCerts(); err != nil {
			return fmt.Errorf("TLS certificates: %w", err)
		}
		// ssl_ca_file makes the server ask clients for a certificate and
		// verify it, which the cert hba method needs.
		fmt.Fprintf(&conf, "ssl = on\nssl_cert_file = %s\nssl_key_file = %s\nssl_ca_file = %s\n",
			quoteLiteral(filepath.Join(s.dir, "server.crt")),
			quoteLiteral(filepath.Join(s.dir, "server.key")),
			quoteLiteral(s.CAFile))
	}
	f, err := os.OpenFile(filepath.Join(s.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(conf.String()); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return s.writeFile(filepath.Join(s.DataDir, "pg_hba.conf"), []byte(hbaConf(opts)), 0o600)
}

// hbaConf renders pg_hba.conf. The first matching line wins. "host" lines
// match TCP connections with and without TLS, so each role authenticates the
// same way whether or not the client negotiates TLS; only cert needs
// "hostssl".
func hbaConf(opts Options) string {
	lines := []string{"local all " + Superuser + " trust"}
	if opts.HBA != nil {
		lines = append(lines, opts.HBA...)
	} else {
		lines = append(lines, "host all "+Superuser+" 127.0.0.1/32 scram-sha-256")
		for _, r := range roles {
			switch {
			case r.method != "cert":
				lines = append(lines, fmt.Sprintf("host all %s 127.0.0.1/32 %s", r.name, r.method))
			case opts.TLS:
				lines = append(lines, fmt.Sprintf("hostssl all %s 127.0.0.1/32 cert", r.name))
			}
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// process is one run of the postmaster; done closes once it has been reaped.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, valid after done
}

// start launches postgres and waits until it accepts connections, picking a
// new port when the one FreePort gave was taken in the meantime.
func (s *Server) start(t testing.TB) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		s.Port = FreePort(t)
		logOffset := fileSize(s.LogFile)
		err := s.launch()
		if err == nil {
			err = s.waitReady()
		}
		if err == nil {
			return
		}
		if attempt < startAttempts && exited(s.proc) &&
			strings.Contains(readFrom(s.LogFile, logOffset), "Address already in use") {
			t.Logf("pgtest: port %d taken, retrying", s.Port)
			continue
		}
		t.Fatalf("pgtest: start postgres on port %d: %v\n%s", s.Port, err, s.logTailSection())
	}
}

func (s *Server) launch() error {
	logf, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close() // the child has its own copy
	// The postmaster runs directly as our child rather than daemonized by
	// pg_ctl, so that Pdeathsig brings it down (SIGQUIT: immediate shutdown)
	// if the test binary dies without running its Cleanups, e.g. on -timeout.
	cmd := s.command(context.Background(), "postgres", "-D", s.DataDir, "-p", strconv.Itoa(s.Port))
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { // reaped here, awaited by stop
		p.err = cmd.Wait()
		close(p.done)
	}()
	s.proc = p
	return nil
}

// waitReady polls the unix socket until the server takes a connection, the
// postmaster exits, or readyTimeout passes.
func (s *Server) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	for {
		conn, err := s.adminConn(ctx, "postgres")
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case <-s.proc.done:
			return fmt.Errorf("postgres exited: %v", s.proc.err)
		case <-ctx.Done():
			return fmt.Errorf("not accepting connections after %v: %w", readyTimeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func exited(p *process) bool {
	if p == nil {
		return true
	}
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop shuts the postmaster down, escalating from fast shutdown (SIGINT:
// abort sessions, checkpoint) to immediate (SIGQUIT) to SIGKILL.
func (s *Server) stop(t testing.TB) {
	p := s.proc
	if p == nil {
		return
	}
	steps := []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGINT, 30 * time.Second}, {syscall.SIGQUIT, 10 * time.Second}, {syscall.SIGKILL, 10 * time.Second}}
	for _, step := range steps {
		if exited(p) {
			return
		}
		_ = p.cmd.Process.Signal(step.sig) // fails only if it has exited meanwhile
		select {
		case <-p.done:
			return
		case <-time.After(step.wait):
			t.Logf("pgtest: postgres pid %d still running %v after %v", p.cmd.Process.Pid, step.wait, step.sig)
		}
	}
	t.Errorf("pgtest: postgres pid %d did not exit", p.cmd.Process.Pid)
}

// Shutdown stops the server as `pg_ctl stop -m mode` does, by the signal
// pg_ctl sends the postmaster (smart SIGTERM, fast SIGINT, immediate
// SIGQUIT), and waits up to a minute for it to exit. The test's Cleanup
// then has nothing left to stop.
func (s *Server) Shutdown(t testing.TB, mode string) {
	t.Helper()
	sig := map[string]syscall.Signal{"smart": syscall.SIGTERM, "fast": syscall.SIGINT, "immediate": syscall.SIGQUIT}[mode]
	if sig == 0 {
		t.Fatalf("pgtest: unknown shutdown mode %q", mode)
	}
	p := s.proc
	if exited(p) {
		return
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(time.Minute):
		t.Fatalf("pgtest: postgres pid %d still running a minute after %s shutdown", p.cmd.Process.Pid, mode)
	}
}

// bootstrap sets the superuser password and creates the roles and AppDB.
func (s *Server) bootstrap() error {
	ctx, cancel := context.WithTimeout(context.Background(), execTimeout)
	defer cancel()
	conn, err := s.adminConn(ctx, "postgres")
	if err != nil {
		return err
	}
	defer conn.Close(ctx)

	create := func(role string) string {
		return fmt.Sprintf("CREATE ROLE %s LOGIN CREATEDB PASSWORD %s", role, quoteLiteral(s.passwords[role]))
	}
	names := make([]string, 0, len(roles))
	for _, r := range roles {
		names = append(names, r.name)
	}
	all := strings.Join(names, ", ")
	stmts := []string{
		"SET password_encryption = 'scram-sha-256'",
		fmt.Sprintf("ALTER ROLE %s PASSWORD %s", Superuser, quoteLiteral(s.passwords[Superuser])),
		create(ScramUser), create(PasswordUser), create(TrustUser), create(CertUser),
		// The md5 hba method can only answer with an md5 hash stored; against
		// a SCRAM verifier the server would switch to SCRAM.
		"SET password_encryption = 'md5'",
		create(MD5User),
		// One statement per Exec: CREATE DATABASE refuses to run in the
		// implicit transaction of a multi-statement query.
		fmt.Sprintf("CREATE DATABASE %s OWNER %s", AppDB, ScramUser),
		fmt.Sprintf("GRANT ALL ON DATABASE %s TO %s", AppDB, all),
	}
	for _, stmt := range stmts {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("%s: %w", redactPasswords(stmt), err)
		}
	}
	// Since PostgreSQL 15 only the database owner may create in public.
	return s.exec(ctx, AppDB, "GRANT ALL ON SCHEMA public TO "+all)
}

func redactPasswords(stmt string) string {
	if i := strings.Index(stmt, " PASSWORD "); i >= 0 {
		return stmt[:i] + " PASSWORD [redacted]"
	}
	return stmt
}

// adminConn connects as the superuser over the unix socket.
func (s *Server) adminConn(ctx context.Context, db string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(keywordDSN("host", s.SocketDir, "port", strconv.Itoa(s.Port),
		"user", Superuser, "dbname", db, "sslmode", "disable"))
	if err != nil {
		return nil, err
	}
	return pgx.ConnectConfig(ctx, cfg)
}

func (s *Server) exec(ctx context.Context, db, sql string) error {
	conn, err := s.adminConn(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// Exec runs sql (one or more statements) as the superuser in database
// "postgres", failing the test on error. See ExecDB.
func (s *Server) Exec(t testing.TB, sql string) {
	t.Helper()
	s.ExecDB(t, "postgres", sql)
}

// ExecDB runs sql (one or more statements, in one implicit transaction) as
// the superuser in db over the unix socket, failing the test on error. It
// works from Cleanup functions too.
func (s *Server) ExecDB(t testing.TB, db, sql string) {
	t.Helper()
	// Not t.Context(): it is already canceled when Cleanup functions run.
	ctx, cancel := context.WithTimeout(context.Background(), execTimeout)
	defer cancel()
	if err := s.exec(ctx, db, sql); err != nil {
		t.Fatalf("pgtest: exec in %s: %v\nSQL: %s", db, err, sql)
	}
}

// Addr returns the TCP address, "127.0.0.1:port".
func (s *Server) Addr() string {
	return net.JoinHostPort(s.Host, strconv.Itoa(s.Port))
}

// Password returns the password of a role created by Start, or "" for any
// other role.
func (s *Server) Password(role string) string {
	return s.passwords[role]
}

// DSN returns a libpq keyword/value connection string for role and db over
// TCP with sslmode=disable. Append keywords to change it: the last
// occurrence of a keyword wins, e.g. DSN(r, db)+" sslmode=verify-full
// sslrootcert="+s.CAFile.
func (s *Server) DSN(role, db string) string {
	return keywordDSN("host", s.Host, "port", strconv.Itoa(s.Port), "user", role,
		"password", s.passwords[role], "dbname", db, "sslmode", "disable")
}

// LogTail returns the last lines of the server log.
func (s *Server) LogTail() string {
	const maxLines, maxBytes = 50, 16 << 10
	data, _ := os.ReadFile(s.LogFile)
	if len(data) > maxBytes {
		data = data[len(data)-maxBytes:]
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

func (s *Server) logTailSection() string {
	return "--- tail of " + s.LogFile + " ---\n" + s.LogTail()
}

// ClientCert writes a client certificate for cn, signed by the server's CA,
// and its key, and returns their paths (for sslcert and sslkey, or
// tls.LoadX509KeyPair). The cert hba method maps the CN to the role name.
// It needs Options.TLS.
func (s *Server) ClientCert(t testing.TB, cn string) (certFile, keyFile string) {
	t.Helper()
	if s.ca == nil {
		t.Fatal("pgtest: ClientCert needs a server started with Options{TLS: true}")
	}
	certPEM, keyPEM, err := s.ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		t.Fatalf("pgtest: client certificate for %q: %v", cn, err)
	}
	f, err := os.CreateTemp(s.dir, "client-*.crt")
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	certFile = f.Name()
	_, err = f.Write(certPEM)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	keyFile = strings.TrimSuffix(certFile, ".crt") + ".key"
	if err == nil {
		err = os.WriteFile(keyFile, keyPEM, 0o600)
	}
	if err != nil {
		t.Fatalf("pgtest: write client certificate: %v", err)
	}
	return certFile, keyFile
}

// writeCerts creates the CA, the server certificate and an unrelated CA.
func (s *Server) writeCerts() error {
	ca, err := newAuthority("pgtest CA")
	if err != nil {
		return err
	}
	certPEM, keyPEM, err := ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return err
	}
	other, err := newAuthority("pgtest unrelated CA")
	if err != nil {
		return err
	}
	s.ca, s.CAPEM = ca, ca.certPEM
	s.CAFile = filepath.Join(s.dir, "ca.crt")
	s.OtherCAFile = filepath.Join(s.dir, "other-ca.crt")
	// postgres rejects a key file readable by others, or not owned by
	// itself or root.
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{s.CAFile, ca.certPEM, 0o644},
		{s.OtherCAFile, other.certPEM, 0o644},
		{filepath.Join(s.dir, "server.crt"), certPEM, 0o644},
		{filepath.Join(s.dir, "server.key"), keyPEM, 0o600},
	} {
		if err := s.writeFile(f.name, f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// authority is a test certificate authority.
type authority struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
}

func newAuthority(cn string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour), // tolerate clock skew
		NotAfter:              now.Add(certValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// issue signs tmpl, filling in serial and validity, for a new P-256 key.
func (a *authority) issue(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = randomSerial()
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = a.cert.NotAfter
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

func randomSerial() *big.Int {
	b := make([]byte, 16)
	rand.Read(b) // never fails: crypto/rand aborts the program instead
	return new(big.Int).SetBytes(b)
}

func randomHex() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// quoteLiteral quotes s as an SQL (and postgresql.conf) string literal.
func quoteLiteral(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// keywordDSN renders libpq keyword/value pairs, leaving out empty values and
// quoting values that need it.
func keywordDSN(kv ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(kv); i += 2 {
		k, v := kv[i], kv[i+1]
		if v == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(k)
		b.WriteByte('=')
		if strings.ContainsAny(v, " '\\\t\n") {
			v = "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
		}
		b.WriteString(v)
	}
	return b.String()
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func readFrom(path string, offset int64) string {
	data, _ := os.ReadFile(path)
	if offset > int64(len(data)) {
		return ""
	}
	return string(bytes.TrimSpace(data[offset:]))
}
