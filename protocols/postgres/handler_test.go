package postgres

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/md5"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgproto3/v2"
	"github.com/jackc/pgx/v5"
	"github.com/xdg-go/scram"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// ---- scripts for the fake upstream ----

// md5Reference is PostgreSQL's MD5 response computed independently of
// md5Password: "md5" + md5hex(md5hex(password+user) + salt).
func md5Reference(user, password string, salt [4]byte) string {
	inner := md5.Sum([]byte(password + user))
	outer := md5.Sum(append([]byte(hex.EncodeToString(inner[:])), salt[:]...))
	return "md5" + hex.EncodeToString(outer[:])
}

func authFailed(user string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "28P01",
		Message: fmt.Sprintf("password authentication failed for user %q", user)}
}

// cleartextScript asks for a cleartext password and checks it.
func cleartextScript(u *upConn) {
	u.send(&pgproto3.AuthenticationCleartextPassword{})
	_ = u.be.SetAuthType(pgproto3.AuthTypeCleartextPassword)
	pm, ok := u.receive().(*pgproto3.PasswordMessage)
	if !ok || pm.Password != testPassword {
		u.send(authFailed(u.params["user"]))
		return
	}
	if u.ready(true) {
		u.serve(nil)
	}
}

// md5Script asks for an MD5 password and checks it against md5Reference.
func md5Script(u *upConn) {
	salt := [4]byte{0x5a, 0x17, 0x00, 0xff}
	u.send(&pgproto3.AuthenticationMD5Password{Salt: salt})
	_ = u.be.SetAuthType(pgproto3.AuthTypeMD5Password)
	pm, ok := u.receive().(*pgproto3.PasswordMessage)
	if !ok || pm.Password != md5Reference(u.params["user"], testPassword, salt) {
		u.send(authFailed(u.params["user"]))
		return
	}
	if u.ready(true) {
		u.serve(nil)
	}
}

// scramOptions vary the SCRAM server.
type scramOptions struct {
	password   string   // the password the server knows
	mechs      []string // offered; default SCRAM-SHA-256
	tamper     bool     // send a wrong server signature
	finalError bool     // send "e=invalid-proof" as the server-final message
}

// scramScript runs a real xdg-go/scram server.
func scramScript(o scramOptions) func(u *upConn) {
	return func(u *upConn) {
		// As PostgreSQL stores it: SASLprep'd, or raw when SASLprep fails.
		client, err := scram.SHA256.NewClient("", o.password, "")
		if err != nil {
			client, err = scram.SHA256.NewClientUnprepped("", o.password, "")
		}
		if err != nil {
			u.t.Errorf("scram client: %v", err)
			return
		}
		stored, err := client.GetStoredCredentialsWithError(scram.KeyFactors{Salt: "credproxy-test-salt", Iters: 4096})
		if err != nil {
			u.t.Errorf("scram stored credentials: %v", err)
			return
		}
		server, err := scram.SHA256.NewServer(func(string) (scram.StoredCredentials, error) { return stored, nil })
		if err != nil {
			u.t.Errorf("scram server: %v", err)
			return
		}
		conv := server.NewConversation()
		mechs := o.mechs
		if mechs == nil {
			mechs = []string{"SCRAM-SHA-256"}
		}
		if !u.send(&pgproto3.AuthenticationSASL{AuthMechanisms: mechs}) {
			return
		}
		_ = u.be.SetAuthType(pgproto3.AuthTypeSASL)
		first, ok := u.receive().(*pgproto3.SASLInitialResponse)
		if !ok {
			return
		}
		if first.AuthMechanism != "SCRAM-SHA-256" {
			u.t.Errorf("SASL mechanism = %q, want SCRAM-SHA-256", first.AuthMechanism)
		}
		s1, err := conv.Step(string(first.Data))
		if err != nil {
			u.send(authFailed(u.params["user"]))
			return
		}
		u.send(&pgproto3.AuthenticationSASLContinue{Data: []byte(s1)})
		_ = u.be.SetAuthType(pgproto3.AuthTypeSASLContinue)
		final, ok := u.receive().(*pgproto3.SASLResponse)
		if !ok {
			return
		}
		s2, err := conv.Step(string(final.Data))
		if err != nil {
			u.send(authFailed(u.params["user"]))
			return
		}
		switch {
		case o.tamper:
			s2 = "v=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
		case o.finalError:
			s2 = "e=invalid-proof"
		}
		if o.tamper || o.finalError {
			// The proxy refuses this final message and may close the
			// connection before or while the rest is written: a failed
			// write here is the proxy doing its job, not a test failure.
			var b []byte
			for _, m := range []pgproto3.BackendMessage{&pgproto3.AuthenticationSASLFinal{Data: []byte(s2)},
				&pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}} {
				b, _ = m.Encode(b)
			}
			_, _ = u.conn.Write(b)
			return
		}
		u.send(&pgproto3.AuthenticationSASLFinal{Data: []byte(s2)})
		if u.ready(true) {
			u.serve(nil)
		}
	}
}

// ---- startup parameters ----

func TestStartupParameters(t *testing.T) {
	tests := []struct {
		name     string
		pinned   string
		client   map[string]string
		want     map[string]string
		database string // in the session_start record
	}{
		{
			name:     "injected user, client's database, other params forwarded",
			client:   map[string]string{"user": "appuser", "database": "appdb", "application_name": "myapp", "client_encoding": "UTF8", "options": "-c search_path=s1"},
			want:     map[string]string{"user": testUser, "database": "appdb", "application_name": "myapp", "client_encoding": "UTF8", "options": "-c search_path=s1"},
			database: "appdb",
		},
		{
			name:     "pinned database",
			pinned:   "pinned",
			client:   map[string]string{"user": "appuser", "database": "otherdb"},
			want:     map[string]string{"user": testUser, "database": "pinned"},
			database: "pinned",
		},
		{
			name:     "pinned database, client sent none",
			pinned:   "pinned",
			client:   map[string]string{"user": "appuser"},
			want:     map[string]string{"user": testUser, "database": "pinned"},
			database: "pinned",
		},
		{
			name:     "no database: the client's user",
			client:   map[string]string{"user": "appuser"},
			want:     map[string]string{"user": testUser, "database": "appuser"},
			database: "appuser",
		},
		{
			name:     "empty database: the client's user",
			client:   map[string]string{"user": "appuser", "database": ""},
			want:     map[string]string{"user": testUser, "database": "appuser"},
			database: "appuser",
		},
		{
			name:     "client password parameter dropped",
			client:   map[string]string{"user": "appuser", "database": "appdb", "password": "client-pw"},
			want:     map[string]string{"user": testUser, "database": "appdb"},
			database: "appdb",
		},
		{
			name:     "protocol options not forwarded",
			client:   map[string]string{"user": "appuser", "database": "appdb", "_pq_.foo": "1"},
			want:     map[string]string{"user": testUser, "database": "appdb"},
			database: "appdb",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			svc := testService(up.addr)
			svc.Database = tc.pinned
			p := startProxy(t, svc)
			c := dialProxy(t, p.addr)
			c.connect(tc.client)
			c.send(&pgproto3.Terminate{})
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
			got := up.startupParams(t, 0)
			if !equalParams(got, tc.want) {
				t.Errorf("upstream startup parameters = %q\nwant %q", got, tc.want)
			}
			starts := p.audit.find(audit.EventSessionStart)
			if len(starts) != 1 || starts[0].Database != tc.database {
				t.Errorf("session_start records %+v, want database %q", starts, tc.database)
			}
		})
	}
}

// ---- authentication ----

func TestMD5Password(t *testing.T) {
	tests := []struct {
		user, password string
		salt           [4]byte
		want           string
	}{
		// md5("postgrespostgres") = 3175bce1d3201d16594cebf9d7eb3f9d, the
		// well-known pg_authid entry; outer hashes from Python's hashlib.
		{"postgres", "postgres", [4]byte{1, 2, 3, 4}, "md568be9ed08db75f318087ab337aaea044"},
		{"dbuser", "secret", [4]byte{0xde, 0xad, 0xbe, 0xef}, "md5c72ec43e211707bdb633669c202ddafa"},
	}
	for _, tc := range tests {
		t.Run(tc.user, func(t *testing.T) {
			if got := md5Password(tc.user, tc.password, tc.salt); got != tc.want {
				t.Errorf("md5Password = %s, want %s", got, tc.want)
			}
			if got := md5Reference(tc.user, tc.password, tc.salt); got != tc.want {
				t.Errorf("md5Reference = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestAuthMethods(t *testing.T) {
	tests := []struct {
		name     string
		script   func(u *upConn)
		password string // the credential's password, when not testPassword
	}{
		{"trust", trustScript(true), ""},
		{"cleartext", cleartextScript, ""},
		{"md5", md5Script, ""},
		{"scram-sha-256", scramScript(scramOptions{password: testPassword}), ""},
		{"scram-sha-256 with a non-ASCII password", scramScript(scramOptions{password: "pässwörd-ü"}), "pässwörd-ü"},
		// SASLprep rejects a password with a control character; PostgreSQL
		// then uses the raw bytes, and so must credproxy.
		{"scram-sha-256 with an unpreppable password", scramScript(scramOptions{password: "pw\u0007bell"}), "pw\u0007bell"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, tc.script)
			var opts []proxyOption
			if tc.password != "" {
				opts = append(opts, withCredentials(staticStore(t, map[string]string{"username": testUser, "password": tc.password})))
			}
			p := startProxy(t, testService(up.addr), opts...)
			c := dialProxy(t, p.addr)
			h := c.connect(map[string]string{"user": "appuser", "database": "appdb"})
			if !h.authOK {
				t.Errorf("no AuthenticationOk")
			}
			c.send(&pgproto3.Query{String: "SELECT 1"})
			if m := c.mustNext(); m.typ != 'C' {
				t.Errorf("after the handover got %q, want CommandComplete", m.typ)
			}
			if m := c.mustNext(); m.typ != 'Z' {
				t.Errorf("got %q, want ReadyForQuery", m.typ)
			}
			c.send(&pgproto3.Terminate{})
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
		})
	}
}

// TestSCRAMTwoSessions checks the cached SCRAM client works for a second
// session (a new nonce, the same salted password).
func TestSCRAMTwoSessions(t *testing.T) {
	up := startUpstream(t, scramScript(scramOptions{password: testPassword}))
	p := startProxy(t, testService(up.addr))
	for i := range 2 {
		c := dialProxy(t, p.addr)
		c.connect(map[string]string{"user": "appuser"})
		c.send(&pgproto3.Terminate{})
		if err := p.wait(t); err != nil {
			t.Errorf("session %d: %v", i, err)
		}
	}
}

func TestUpstreamAuthFailures(t *testing.T) {
	tests := []struct {
		name       string
		script     func(u *upConn)
		wantCodes  []string // any of
		wantInMsg  []string
		wantReason string
	}{
		{
			name: "cleartext rejected",
			script: func(u *upConn) {
				u.send(&pgproto3.AuthenticationCleartextPassword{})
				u.receive()
				u.send(authFailed(testUser))
			},
			wantCodes:  []string{"28P01", "28000"},
			wantInMsg:  []string{"upstream rejected the injected credential", `"c"`},
			wantReason: "upstream auth failed",
		},
		{
			name: "md5 rejected",
			script: func(u *upConn) {
				u.send(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}})
				u.receive()
				u.send(authFailed(testUser))
			},
			wantCodes:  []string{"28P01", "28000"},
			wantInMsg:  []string{"upstream rejected the injected credential"},
			wantReason: "upstream auth failed",
		},
		{
			name: "pg_hba rejects before any auth request",
			script: func(u *upConn) {
				u.send(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28000", Message: `no pg_hba.conf entry for host "127.0.0.1"`})
			},
			wantCodes:  []string{"28000"},
			wantInMsg:  []string{"upstream rejected the injected credential", "pg_hba.conf"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "scram with the wrong password",
			script:     scramScript(scramOptions{password: "not-the-injected-one"}),
			wantCodes:  []string{"28P01", "28000"},
			wantInMsg:  []string{"upstream rejected the injected credential"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "scram server signature wrong",
			script:     scramScript(scramOptions{password: testPassword, tamper: true}),
			wantCodes:  []string{"28000"},
			wantInMsg:  []string{"SCRAM"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "scram server-final error",
			script:     scramScript(scramOptions{password: testPassword, finalError: true}),
			wantCodes:  []string{"28000"},
			wantInMsg:  []string{"SCRAM"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "only SCRAM-SHA-256-PLUS offered",
			script:     scramScript(scramOptions{password: testPassword, mechs: []string{"SCRAM-SHA-256-PLUS"}}),
			wantCodes:  []string{"28000"},
			wantInMsg:  []string{"SCRAM-SHA-256 only"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "GSSAPI requested",
			script:     func(u *upConn) { u.send(&pgproto3.AuthenticationGSS{}); u.receive() },
			wantCodes:  []string{"28000"},
			wantInMsg:  []string{"GSSAPI"},
			wantReason: "upstream auth failed",
		},
		{
			name:       "AuthenticationOk skipped by ReadyForQuery",
			script:     func(u *upConn) { u.send(&pgproto3.ReadyForQuery{TxStatus: 'I'}); u.receive() },
			wantCodes:  []string{"08001"},
			wantInMsg:  []string{"handshake failed"},
			wantReason: "upstream protocol error",
		},
		{
			name:       "upstream closes during the handshake",
			script:     func(u *upConn) { u.send(&pgproto3.AuthenticationCleartextPassword{}); u.receive() },
			wantCodes:  []string{"08001"},
			wantInMsg:  []string{"handshake failed"},
			wantReason: "upstream protocol error",
		},
		{
			name: "database does not exist, after authentication",
			script: func(u *upConn) {
				u.send(&pgproto3.AuthenticationOk{}, &pgproto3.ErrorResponse{Severity: "FATAL", Code: "3D000", Message: `database "nope" does not exist`})
			},
			wantCodes:  []string{"3D000"},
			wantInMsg:  []string{`database "nope" does not exist`},
			wantReason: "upstream error",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, tc.script)
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			c.write(encodeStartup(protocol30, map[string]string{"user": "appuser", "database": "appdb"}))
			resp := c.readError()
			if resp == nil {
				t.Fatalf("no ErrorResponse")
			}
			if resp.Severity != "FATAL" {
				t.Errorf("severity = %q, want FATAL", resp.Severity)
			}
			if !containsString(tc.wantCodes, resp.Code) {
				t.Errorf("SQLSTATE = %s, want one of %v (message %q)", resp.Code, tc.wantCodes, resp.Message)
			}
			for _, s := range tc.wantInMsg {
				if !strings.Contains(resp.Message, s) {
					t.Errorf("message %q does not contain %q", resp.Message, s)
				}
			}
			if strings.Contains(resp.Message+resp.Detail+resp.Hint, testPassword) {
				t.Errorf("error shows the password: %+v", resp)
			}
			if err := p.wait(t); err == nil {
				t.Errorf("ServeConn returned nil for a failed session")
			}
			denied := p.audit.find(audit.EventDenied)
			if len(denied) != 1 {
				t.Fatalf("denied records: %d, want 1 (events %v)", len(denied), p.audit.events())
			}
			if denied[0].Reason != tc.wantReason {
				t.Errorf("denied reason = %q, want %q", denied[0].Reason, tc.wantReason)
			}
			if denied[0].SQLState != resp.Code {
				t.Errorf("denied sqlstate = %q, want %q", denied[0].SQLState, resp.Code)
			}
			if len(p.audit.find(audit.EventSessionStart)) != 0 {
				t.Errorf("a failed session was audited as started")
			}
		})
	}
}

// PostgreSQL refuses some connections before it asks for a password, with
// errors that have nothing to do with the credential: 53300 "sorry, too many
// clients already", 57P03 "the database system is starting up", 57P01 "the
// database system is shutting down". They must reach the app as the
// upstream said them (retryable), not as 28000 "upstream rejected the
// injected credential".
func TestUpstreamRefusalBeforeAuthIsNotAnAuthFailure(t *testing.T) {
	tests := []struct {
		code, msg string
	}{
		{"53300", "sorry, too many clients already"},
		{"57P03", "the database system is starting up"},
		{"57P01", "the database system is shutting down"},
	}
	for _, tc := range tests {
		t.Run(tc.code, func(t *testing.T) {
			up := startUpstream(t, func(u *upConn) {
				u.send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: tc.code, Message: tc.msg})
			})
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			c.write(encodeStartup(protocol30, map[string]string{"user": "appuser"}))
			resp := c.readError()
			_ = p.wait(t)
			if resp == nil {
				t.Fatalf("no ErrorResponse")
			}
			if resp.Code != tc.code {
				t.Errorf("SQLSTATE = %s (%q), want the upstream's %s", resp.Code, resp.Message, tc.code)
			}
			if strings.Contains(resp.Message, "rejected the injected credential") {
				t.Errorf("message %q blames the credential", resp.Message)
			}
			if d := p.audit.find(audit.EventDenied); len(d) == 1 && d[0].Reason == "upstream auth failed" {
				t.Errorf("audited as %q", d[0].Reason)
			}
		})
	}
}

func TestUnreachableUpstream(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now

	p := startProxy(t, testService(addr))
	c := dialProxy(t, p.addr)
	c.write(encodeStartup(protocol30, map[string]string{"user": "appuser"}))
	resp := c.readError()
	if resp == nil {
		t.Fatalf("no ErrorResponse")
	}
	if resp.Code != "08001" {
		t.Errorf("SQLSTATE = %s, want 08001", resp.Code)
	}
	for _, s := range []string{"credproxy: ", "unreachable", addr} {
		if !strings.Contains(resp.Message, s) {
			t.Errorf("message %q does not contain %q", resp.Message, s)
		}
	}
	if err := p.wait(t); err == nil {
		t.Errorf("ServeConn returned nil")
	}
	denied := p.audit.find(audit.EventDenied)
	if len(denied) != 1 || denied[0].Reason != "upstream unreachable" || denied[0].SQLState != "08001" {
		t.Errorf("denied records = %+v, want one with reason upstream unreachable", denied)
	}
}

func TestCredentialProblems(t *testing.T) {
	tests := []struct {
		name      string
		creds     func(t *testing.T) proxy.Credentials
		credName  string
		wantInMsg []string
	}{
		{
			name:      "no password field",
			creds:     func(t *testing.T) proxy.Credentials { return staticStore(t, map[string]string{"username": testUser}) },
			wantInMsg: []string{`credential "c" unavailable`, `"password"`},
		},
		{
			name: "no username field",
			creds: func(t *testing.T) proxy.Credentials {
				return staticStore(t, map[string]string{"password": testPassword})
			},
			wantInMsg: []string{`credential "c" unavailable`, `"username"`},
		},
		{
			name:      "unknown credential",
			creds:     func(t *testing.T) proxy.Credentials { return defaultStore(t) },
			credName:  "nope",
			wantInMsg: []string{`credential "nope" unavailable: no such credential`},
		},
		{
			name: "source error",
			creds: func(t *testing.T) proxy.Credentials {
				return newStore(t, map[string]credentials.Source{"c": credentials.NewEnv(map[string]string{"username": "CREDPROXY_TEST_UNSET_USER"})}, credentials.Options{FetchTimeout: 50 * time.Millisecond})
			},
			wantInMsg: []string{`credential "c" unavailable`, "CREDPROXY_TEST_UNSET_USER"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			svc := testService(up.addr)
			if tc.credName != "" {
				svc.Credentials = tc.credName
			}
			p := startProxy(t, svc, withCredentials(tc.creds(t)))
			c := dialProxy(t, p.addr)
			c.write(encodeStartup(protocol30, map[string]string{"user": "appuser"}))
			resp := c.readError()
			if resp == nil {
				t.Fatalf("no ErrorResponse")
			}
			if resp.Code != "08006" || resp.Severity != "FATAL" {
				t.Errorf("got %s %s, want FATAL 08006", resp.Severity, resp.Code)
			}
			for _, s := range tc.wantInMsg {
				if !strings.Contains(resp.Message, s) {
					t.Errorf("message %q does not contain %q", resp.Message, s)
				}
			}
			if err := p.wait(t); err == nil {
				t.Errorf("ServeConn returned nil")
			}
			if n := up.connCount(); n != 0 {
				t.Errorf("upstream got %d connections without a usable credential", n)
			}
			denied := p.audit.find(audit.EventDenied)
			if len(denied) != 1 || denied[0].Reason != "credential unavailable" {
				t.Errorf("denied records = %+v, want reason credential unavailable", denied)
			}
		})
	}
}

// ---- handover ----

func TestHandover(t *testing.T) {
	notice := pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: "01000", Message: "upstream says hello"}
	up := startUpstream(t, func(u *upConn) {
		msgs := []pgproto3.BackendMessage{&pgproto3.AuthenticationOk{}}
		for i := range upstreamParams {
			msgs = append(msgs, &upstreamParams[i])
		}
		msgs = append(msgs, &notice,
			&pgproto3.BackendKeyData{ProcessID: upstreamPID, SecretKey: upstreamSecret},
			&pgproto3.ReadyForQuery{TxStatus: 'I'})
		if u.send(msgs...) {
			u.serve(nil)
		}
	})
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	h := c.connect(map[string]string{"user": "appuser", "database": "appdb"})

	wantTypes := "R" + strings.Repeat("S", len(upstreamParams)) + "NKZ"
	if h.types != wantTypes {
		t.Errorf("message types = %q, want %q", h.types, wantTypes)
	}
	for _, ps := range upstreamParams {
		if got := h.params[ps.Name]; got != ps.Value {
			t.Errorf("ParameterStatus %s = %q, want %q", ps.Name, got, ps.Value)
		}
	}
	if len(h.notices) != 1 || h.notices[0].Message != notice.Message {
		t.Errorf("notices = %+v, want the upstream's", h.notices)
	}
	if h.key == nil {
		t.Fatalf("no BackendKeyData")
	}
	// The app sees the backend's own process id (what pg_backend_pid() and
	// pg_stat_activity show) and a secret of credproxy's.
	if h.key.ProcessID != upstreamPID || h.key.SecretKey == upstreamSecret {
		t.Errorf("BackendKeyData %d/%#x; want the upstream's pid %d and another secret than %#x", h.key.ProcessID, h.key.SecretKey, upstreamPID, upstreamSecret)
	}
	if h.key.ProcessID == 0 || int32(h.key.ProcessID) < 0 {
		t.Errorf("issued pid %d is not a positive int32", h.key.ProcessID)
	}
	if tgt, ok := p.cancels.lookup(h.key.ProcessID, h.key.SecretKey); !ok || !tgt.has ||
		tgt.key.ProcessID != upstreamPID || tgt.key.SecretKey != upstreamSecret {
		t.Errorf("registry entry for the issued key = %+v, %v; want the upstream's key", tgt.key, ok)
	}
	if h.txStatus != 'I' {
		t.Errorf("ReadyForQuery status = %q, want I", h.txStatus)
	}
	c.send(&pgproto3.Terminate{})
	if err := p.wait(t); err != nil {
		t.Errorf("ServeConn: %v", err)
	}
	if _, ok := p.cancels.lookup(h.key.ProcessID, h.key.SecretKey); ok {
		t.Errorf("the issued key is still registered after the session ended")
	}
}

func TestHandoverWithoutBackendKeyData(t *testing.T) {
	up := startUpstream(t, trustScript(false))
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	h := c.connect(map[string]string{"user": "appuser"})
	if h.key == nil {
		t.Fatalf("no BackendKeyData: clients expect one")
	}
	if h.types != "R"+strings.Repeat("S", len(upstreamParams))+"KZ" {
		t.Errorf("message types = %q", h.types)
	}

	// A cancel with that key has nowhere to go: nothing is sent upstream.
	cc := dialProxy(t, p.addr)
	cc.write(cancelPacket(h.key.ProcessID, h.key.SecretKey))
	cc.expectClosed()
	if err := p.wait(t); err != nil {
		t.Errorf("cancel ServeConn: %v", err)
	}
	if n := up.connCount(); n != 1 {
		t.Errorf("upstream got %d connections, want 1 (no cancel)", n)
	}

	c.send(&pgproto3.Query{String: "SELECT 1"})
	if m := c.mustNext(); m.typ != 'C' {
		t.Errorf("got %q, want CommandComplete", m.typ)
	}
}

func TestPgxClient(t *testing.T) {
	tests := []struct {
		name   string
		params string
	}{
		{"protocol 3.0", ""},
		{"protocol 3.2 requested", "&max_protocol_version=3.2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
			defer cancel()
			dsn := fmt.Sprintf("postgres://appuser@%s/appdb?sslmode=disable%s", p.addr, tc.params)
			conn, err := pgx.Connect(ctx, dsn)
			if err != nil {
				t.Fatalf("pgx.Connect: %v", err)
			}
			if _, err := conn.Exec(ctx, "SELECT 1"); err != nil {
				t.Errorf("Exec: %v", err)
			}
			pc := conn.PgConn()
			if sk := pc.SecretKey(); pc.PID() != upstreamPID || len(sk) == 4 && binary.BigEndian.Uint32(sk) == upstreamSecret {
				t.Errorf("pgx sees %d/%x; want the upstream's pid with credproxy's secret", pc.PID(), sk)
			}
			if got := pc.ParameterStatus("server_version"); got != "16.2" {
				t.Errorf("server_version = %q, want 16.2", got)
			}
			if err := pc.CancelRequest(ctx); err != nil {
				t.Errorf("CancelRequest: %v", err)
			}
			select {
			case cr := <-up.cancelCh:
				if cr.ProcessID != upstreamPID || cr.SecretKey != upstreamSecret {
					t.Errorf("upstream got cancel %d/%#x, want %d/%#x", cr.ProcessID, cr.SecretKey, upstreamPID, upstreamSecret)
				}
			case <-time.After(ioTimeout):
				t.Errorf("no cancel request reached the upstream")
			}
			if err := p.wait(t); err != nil { // the cancel connection
				t.Errorf("cancel ServeConn: %v", err)
			}
			if err := conn.Close(ctx); err != nil {
				t.Errorf("Close: %v", err)
			}
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
			got := up.startupParams(t, 0)
			if got["user"] != testUser || got["database"] != "appdb" {
				t.Errorf("upstream startup = %q", got)
			}
		})
	}
}

// ---- startup requests ----

func TestStartupRequests(t *testing.T) {
	tests := []struct {
		name     string
		requests []uint32
	}{
		{"SSLRequest", []uint32{sslRequestCode}},
		{"GSSENCRequest", []uint32{gssEncRequestCode}},
		{"GSSENCRequest then SSLRequest", []uint32{gssEncRequestCode, sslRequestCode}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			for _, code := range tc.requests {
				c.write(requestPacket(code))
				if b := c.readByte(); b != 'N' {
					t.Fatalf("answer to request %d = %q, want N", code, b)
				}
			}
			c.connect(map[string]string{"user": "appuser"})
			c.send(&pgproto3.Terminate{})
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
		})
	}
}

func TestSSLRequestWithTrailingData(t *testing.T) {
	up := startUpstream(t, trustScript(true))
	p := startProxy(t, testService(up.addr))
	c := dialProxy(t, p.addr)
	c.write(append(requestPacket(sslRequestCode), encodeStartup(protocol30, map[string]string{"user": "x"})...))
	resp := c.readError()
	if resp == nil || resp.Code != "08P01" || !strings.Contains(resp.Message, "after SSLRequest") {
		t.Errorf("got %+v, want 08P01 unexpected data after SSLRequest", resp)
	}
	if err := p.wait(t); err == nil {
		t.Errorf("ServeConn returned nil")
	}
	if n := up.connCount(); n != 0 {
		t.Errorf("upstream got %d connections", n)
	}
}

// writeSelfSigned writes a certificate and key for 127.0.0.1 into dir.
func writeSelfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "credproxy-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestClientTLS(t *testing.T) {
	certFile, keyFile := writeSelfSigned(t, t.TempDir())
	up := startUpstream(t, trustScript(true))
	svc := testService(up.addr)
	svc.ClientTLS = &config.ClientTLS{CertFile: certFile, KeyFile: keyFile}
	p := startProxy(t, svc, withAuditQueries)

	raw := dialProxy(t, p.addr)
	raw.write(requestPacket(sslRequestCode))
	if b := raw.readByte(); b != 'S' {
		t.Fatalf("answer to SSLRequest = %q, want S", b)
	}
	tc := tls.Client(raw.conn, &tls.Config{InsecureSkipVerify: true}) // self-signed test certificate
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	c := &testClient{t: t, conn: tc, rd: raw.rd}
	c.rd.Reset(tc)
	c.connect(map[string]string{"user": "appuser"})
	c.send(&pgproto3.Query{String: "SELECT 'over tls'"})
	if m := c.mustNext(); m.typ != 'C' {
		t.Errorf("got %q, want CommandComplete", m.typ)
	}
	c.mustNext()
	c.send(&pgproto3.Terminate{})
	if err := p.wait(t); err != nil {
		t.Errorf("ServeConn: %v", err)
	}
	q := p.audit.find(audit.EventQuery)
	if len(q) != 1 || q[0].SQL != "SELECT 'over tls'" {
		t.Errorf("query records = %+v", q)
	}
}

func TestNegotiateProtocolVersion(t *testing.T) {
	tests := []struct {
		name        string
		version     uint32
		options     map[string]string
		wantOptions []string
	}{
		{"protocol 3.2", 3<<16 | 2, nil, nil},
		{"protocol 3.0 with a _pq_ option", protocol30, map[string]string{"_pq_.foo": "on"}, []string{"_pq_.foo"}},
		{"protocol 3.2 with two _pq_ options", 3<<16 | 2, map[string]string{"_pq_.a": "1", "_pq_.b": "2"}, []string{"_pq_.a", "_pq_.b"}},
		{"protocol 3.9999", 3<<16 | 9999, nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			params := map[string]string{"user": "appuser", "database": "appdb"}
			for k, v := range tc.options {
				params[k] = v
			}
			c.write(encodeStartup(tc.version, params))
			h := c.readHandover()
			if h.err != nil {
				t.Fatalf("handover failed: %s %s", h.err.Code, h.err.Message)
			}
			if !strings.HasPrefix(h.types, "vR") {
				t.Errorf("message types = %q, want NegotiateProtocolVersion first", h.types)
			}
			if h.negotiate == nil {
				t.Fatalf("no NegotiateProtocolVersion")
			}
			// PostgreSQL sends its newest version as a full protocol number.
			if h.negotiate.version != protocol30 {
				t.Errorf("newest version = %d, want %d (3.0)", h.negotiate.version, protocol30)
			}
			if got, want := strings.Join(sortedCopy(h.negotiate.options), ","), strings.Join(tc.wantOptions, ","); got != want {
				t.Errorf("unrecognized options = %q, want %q", got, want)
			}
			for k := range up.startupParams(t, 0) {
				if strings.HasPrefix(k, "_pq_.") {
					t.Errorf("upstream got protocol option %s", k)
				}
			}
			// The session continues.
			c.send(&pgproto3.Query{String: "SELECT 1"})
			if m := c.mustNext(); m.typ != 'C' {
				t.Errorf("got %q, want CommandComplete", m.typ)
			}
			c.mustNext()
			c.send(&pgproto3.Terminate{})
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
		})
	}
}

func TestUnsupportedProtocol(t *testing.T) {
	tests := []struct {
		name    string
		version uint32
	}{
		{"2.0", 2 << 16},
		{"4.0", 4 << 16},
		{"1234.1", 1234<<16 | 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			c.write(encodeStartup(tc.version, map[string]string{"user": "appuser"}))
			resp := c.readError()
			if resp == nil {
				t.Fatalf("no ErrorResponse")
			}
			if resp.Code != "0A000" || resp.Severity != "FATAL" {
				t.Errorf("got %s %s %q, want FATAL 0A000", resp.Severity, resp.Code, resp.Message)
			}
			if err := p.wait(t); err == nil {
				t.Errorf("ServeConn returned nil")
			}
			if n := up.connCount(); n != 0 {
				t.Errorf("upstream got %d connections", n)
			}
			if d := p.audit.find(audit.EventDenied); len(d) != 1 || d[0].SQLState != "0A000" {
				t.Errorf("denied records = %+v", d)
			}
		})
	}
}

func TestBadStartup(t *testing.T) {
	oversized := encodeStartup(protocol30, map[string]string{"user": strings.Repeat("u", maxStartupPacket)})
	tests := []struct {
		name      string
		data      []byte
		halfClose bool
		wantInMsg string
	}{
		{"http request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false, "invalid startup packet"},
		{"tls client hello", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03}, false, "invalid startup packet"},
		{"oversized length", oversized, false, "invalid startup packet"},
		{"length 0x7fffffff", []byte{0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0}, false, "invalid startup packet"},
		{"length 0xffffffff", []byte{0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0}, false, "invalid startup packet"},
		{"length below 8", []byte{0, 0, 0, 4, 0, 3, 0, 0}, false, "invalid startup packet"},
		// Only the length, and the connection left open: refused at once,
		// not after the startup timeout ("no startup packet within").
		{"length below 8 alone", []byte{0, 0, 0, 4}, false, "invalid startup packet"},
		{"length 0 alone", []byte{0, 0, 0, 0}, false, "invalid startup packet"},
		{"SSLRequest with a body", []byte{0, 0, 0, 12, 0x04, 0xd2, 0x16, 0x2f, 1, 2, 3, 4}, false, "invalid startup packet"},
		{"StartupMessage without terminator", []byte{0, 0, 0, 17, 0, 3, 0, 0, 'u', 's', 'e', 'r', 0, 'b', 'o', 'b', 0}, false, "invalid startup packet"},
		{"truncated then closed", encodeStartup(protocol30, map[string]string{"user": "appuser"})[:12], true, "connection closed during startup"},
		{"header truncated then closed", []byte{0, 0, 0}, true, "connection closed during startup"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			c.write(tc.data)
			if tc.halfClose {
				if err := c.conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			resp := c.readError() // fails unless the proxy closes
			if resp != nil && (resp.Code != "08P01" || !strings.Contains(resp.Message, tc.wantInMsg)) {
				t.Errorf("got %s %q, want 08P01 %q", resp.Code, resp.Message, tc.wantInMsg)
			}
			if err := p.wait(t); err == nil {
				t.Errorf("ServeConn returned nil")
			}
			if n := up.connCount(); n != 0 {
				t.Errorf("upstream got %d connections", n)
			}
			denied := p.audit.find(audit.EventDenied)
			if len(denied) != 1 || denied[0].Reason != "bad startup" || denied[0].SQLState != "08P01" {
				t.Errorf("denied records = %+v, want one bad startup 08P01", denied)
			}
		})
	}
}

func TestProbeAndMalformedCancel(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{"connect and close", nil},
		{"cancel request too short", []byte{0, 0, 0, 12, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1}},
		{"cancel request too long", []byte{0, 0, 0, 20, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			p := startProxy(t, testService(up.addr))
			c := dialProxy(t, p.addr)
			if tc.data != nil {
				c.write(tc.data)
			}
			if err := c.conn.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			c.expectClosed()
			if err := p.wait(t); err != nil {
				t.Errorf("ServeConn: %v, want nil", err)
			}
			if n := up.connCount(); n != 0 {
				t.Errorf("upstream got %d connections", n)
			}
			if ev := p.audit.events(); len(ev) != 0 {
				t.Errorf("audit records %v, want none", ev)
			}
		})
	}
}

func TestStartupTimeout(t *testing.T) {
	tests := []struct {
		name    string
		data    []byte
		answerN bool // the proxy answers 'N' first
	}{
		{"nothing sent", nil, false},
		{"partial header", []byte{0, 0}, false},
		{"partial body", encodeStartup(protocol30, map[string]string{"user": "appuser"})[:15], false},
		{"after SSLRequest", requestPacket(sslRequestCode), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, trustScript(true))
			svc := testService(up.addr)
			svc.StartupTimeout = config.Duration(200 * time.Millisecond)
			p := startProxy(t, svc)
			c := dialProxy(t, p.addr)
			if tc.data != nil {
				c.write(tc.data)
			}
			if tc.answerN {
				if b := c.readByte(); b != 'N' {
					t.Fatalf("answer = %q, want N", b)
				}
			}
			resp := c.readError() // the proxy must close well before ioTimeout
			if resp == nil || resp.Code != "08P01" || !strings.Contains(resp.Message, "no startup packet within 200ms") {
				t.Errorf("got %+v, want 08P01 no startup packet within 200ms", resp)
			}
			if err := p.wait(t); err == nil {
				t.Errorf("ServeConn returned nil")
			}
			if d := p.audit.find(audit.EventDenied); len(d) != 1 {
				t.Errorf("denied records = %+v, want 1", d)
			}
		})
	}
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
