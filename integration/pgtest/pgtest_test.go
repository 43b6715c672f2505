package pgtest

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: runs PostgreSQL; skipped with -short")
	}
}

func TestKeywordDSN(t *testing.T) {
	tests := []struct {
		name string
		kv   []string
		want string
	}{
		{"plain", []string{"host", "127.0.0.1", "port", "5432"}, "host=127.0.0.1 port=5432"},
		{"empty value left out", []string{"user", "u", "password", ""}, "user=u"},
		{"quoted", []string{"password", `it's a \secret`}, `password='it\'s a \\secret'`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := keywordDSN(tt.kv...); got != tt.want {
				t.Errorf("keywordDSN() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestHBAConf(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		want []string // lines, in order
		not  string   // must not occur; "" checks nothing
	}{
		{"plain", Options{}, []string{"local all postgres trust", "host all scram_user 127.0.0.1/32 scram-sha-256", "host all md5_user 127.0.0.1/32 md5"}, "cert"},
		{"tls", Options{TLS: true}, []string{"local all postgres trust", "hostssl all cert_user 127.0.0.1/32 cert"}, ""},
		{"override", Options{HBA: []string{"host all all 127.0.0.1/32 trust"}}, []string{"local all postgres trust", "host all all 127.0.0.1/32 trust"}, "scram"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := hbaConf(tt.opts)
			rest := got
			for _, line := range tt.want {
				i := strings.Index(rest, line+"\n")
				if i < 0 {
					t.Fatalf("hbaConf() lacks %q in order:\n%s", line, got)
				}
				rest = rest[i:]
			}
			if tt.not != "" && strings.Contains(got, tt.not) {
				t.Errorf("hbaConf() contains %q:\n%s", tt.not, got)
			}
		})
	}
}

func TestFreePort(t *testing.T) {
	port := FreePort(t)
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatalf("FreePort() = %d, which cannot be bound: %v", port, err)
	}
	ln.Close()
}

func TestServerTLS(t *testing.T) {
	skipShort(t)
	srv := Start(t, Options{TLS: true})
	verifyFull := " sslmode=verify-full sslrootcert=" + srv.CAFile

	t.Run("auth methods", func(t *testing.T) {
		tests := []struct {
			role, method string
			storedPrefix string // of pg_authid.rolpassword
		}{
			{Superuser, "scram-sha-256", "SCRAM-SHA-256$"},
			{ScramUser, "scram-sha-256", "SCRAM-SHA-256$"},
			{MD5User, "md5", "md5"},
			{PasswordUser, "password", "SCRAM-SHA-256$"},
			{TrustUser, "trust", "SCRAM-SHA-256$"},
		}
		for _, tt := range tests {
			t.Run(tt.role, func(t *testing.T) {
				if got := authMethod(t, srv.Addr(), tt.role); got != tt.method {
					t.Errorf("server asked %s for %s, want %s", tt.role, got, tt.method)
				}
				if got := queryString(t, srv.DSN(Superuser, "postgres"),
					"SELECT rolpassword FROM pg_authid WHERE rolname = $1", tt.role); !strings.HasPrefix(got, tt.storedPrefix) {
					t.Errorf("stored password of %s = %.16q..., want prefix %q", tt.role, got, tt.storedPrefix)
				}

				if got := queryString(t, srv.DSN(tt.role, AppDB), "SELECT current_user"); got != tt.role {
					t.Errorf("current_user = %q, want %q", got, tt.role)
				}
				conn := connect(t, srv.DSN(tt.role, AppDB)+verifyFull)
				var ssl bool
				if err := conn.QueryRow(context.Background(), "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&ssl); err != nil || !ssl {
					t.Errorf("pg_stat_ssl.ssl = %v, %v; want true over verify-full", ssl, err)
				}
				if _, err := conn.Exec(context.Background(), "CREATE TABLE t_"+tt.role+" (id int); INSERT INTO t_"+tt.role+" VALUES (1)"); err != nil {
					t.Errorf("create table in %s: %v", AppDB, err)
				}

				if tt.method == "trust" {
					return
				}
				_, err := pgx.Connect(context.Background(), srv.DSN(tt.role, AppDB)+" password=wrong")
				if code := pgCode(err); code != "28P01" {
					t.Errorf("wrong password: err = %v (SQLSTATE %q), want invalid_password 28P01", err, code)
				}
			})
		}
	})

	t.Run("client certificate", func(t *testing.T) {
		cert, key := srv.ClientCert(t, CertUser)
		withCert := srv.DSN(CertUser, AppDB) + verifyFull + " sslcert=" + cert + " sslkey=" + key
		if got := queryString(t, withCert, "SELECT current_user"); got != CertUser {
			t.Errorf("current_user = %q, want %q", got, CertUser)
		}

		otherCert, otherKey := srv.ClientCert(t, "someone_else")
		_, err := pgx.Connect(context.Background(), srv.DSN(CertUser, AppDB)+verifyFull+" sslcert="+otherCert+" sslkey="+otherKey)
		if code := pgCode(err); code != "28000" {
			t.Errorf("certificate for another CN: err = %v (SQLSTATE %q), want 28000", err, code)
		}
		_, err = pgx.Connect(context.Background(), srv.DSN(CertUser, AppDB))
		if code := pgCode(err); code != "28000" {
			t.Errorf("cert_user without TLS: err = %v (SQLSTATE %q), want 28000", err, code)
		}
	})

	t.Run("unrelated CA", func(t *testing.T) {
		_, err := pgx.Connect(context.Background(), srv.DSN(ScramUser, AppDB)+" sslmode=verify-full sslrootcert="+srv.OtherCAFile)
		var unknownCA x509.UnknownAuthorityError
		if !errors.As(err, &unknownCA) {
			t.Errorf("verify-full against OtherCAFile: err = %v, want x509.UnknownAuthorityError", err)
		}
	})

	t.Run("exec", func(t *testing.T) {
		srv.ExecDB(t, AppDB, "CREATE TABLE admin_made (id int); INSERT INTO admin_made VALUES (42)")
		if got := queryString(t, srv.DSN(Superuser, AppDB), "SELECT id::text FROM admin_made"); got != "42" {
			t.Errorf("admin_made.id = %q, want 42", got)
		}
		srv.Exec(t, "CREATE ROLE made_by_exec")
		if got := queryString(t, srv.DSN(Superuser, "postgres"), "SELECT count(*)::text FROM pg_roles WHERE rolname = 'made_by_exec'"); got != "1" {
			t.Errorf("roles named made_by_exec = %s, want 1", got)
		}
		if got := queryString(t, srv.DSN(Superuser, "postgres"), "SHOW max_connections"); got != "300" {
			t.Errorf("max_connections = %s, want 300", got)
		}
		if !strings.Contains(srv.LogTail(), "connection authorized") {
			t.Errorf("LogTail() lacks connection log lines:\n%s", srv.LogTail())
		}
	})
}

// TestServerOptions covers a server without TLS, and that Cleanup stops it
// and removes its files.
func TestServerOptions(t *testing.T) {
	skipShort(t)
	var srv *Server
	t.Run("plain", func(t *testing.T) {
		srv = Start(t, Options{MaxConnections: 20, SuperuserPassword: `it's a \secret`})
		if got := srv.Password(Superuser); got != `it's a \secret` {
			t.Errorf("Password(postgres) = %q", got)
		}
		if got := queryString(t, srv.DSN(Superuser, "postgres"), "SHOW max_connections"); got != "20" {
			t.Errorf("max_connections = %s, want 20", got)
		}
		if got := queryString(t, srv.DSN(ScramUser, AppDB), "SHOW ssl"); got != "off" {
			t.Errorf("ssl = %s, want off", got)
		}
		if _, err := pgx.Connect(context.Background(), srv.DSN(ScramUser, AppDB)+" sslmode=require"); err == nil {
			t.Error("sslmode=require succeeded against a server without TLS")
		}
		if srv.CAFile != "" || srv.Password("nobody") != "" {
			t.Errorf("CAFile = %q, Password(nobody) = %q; want both empty", srv.CAFile, srv.Password("nobody"))
		}
	})
	if srv == nil {
		return
	}
	if conn, err := net.DialTimeout("tcp", srv.Addr(), time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after Cleanup", srv.Addr())
	}
	if _, err := os.Stat(srv.DataDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists after Cleanup: %v", srv.DataDir, err)
	}
}

// authMethod returns which authentication the server asks of role, read off
// its first reply to a startup message.
func authMethod(t *testing.T, addr, role string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	fe := pgproto3.NewFrontend(conn, conn)
	fe.Send(&pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters:      map[string]string{"user": role, "database": AppDB},
	})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	msg, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	switch m := msg.(type) {
	case *pgproto3.AuthenticationSASL:
		if len(m.AuthMechanisms) > 0 && m.AuthMechanisms[0] == "SCRAM-SHA-256" {
			return "scram-sha-256"
		}
		return "sasl " + strings.Join(m.AuthMechanisms, ",")
	case *pgproto3.AuthenticationMD5Password:
		return "md5"
	case *pgproto3.AuthenticationCleartextPassword:
		return "password"
	case *pgproto3.AuthenticationOk:
		return "trust"
	default:
		return fmt.Sprintf("unexpected %T", m)
	}
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func queryString(t *testing.T, dsn, sql string, args ...any) string {
	t.Helper()
	var s string
	if err := connect(t, dsn).QueryRow(context.Background(), sql, args...).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}
