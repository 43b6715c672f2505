package postgres

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgproto3/v2"
	"github.com/xdg-go/scram"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// TLS modes, as libpq names them.
const (
	tlsDisable    = "disable"
	tlsRequire    = "require"
	tlsVerifyCA   = "verify-ca"
	tlsVerifyFull = "verify-full"
)

// upstreamTLSConfig builds the client TLS configuration for a service, or nil
// for mode disable. As in libpq, require with a CA file behaves as verify-ca.
func upstreamTLSConfig(c config.PostgresTLS, serverName string) (*tls.Config, error) {
	mode := c.Mode
	if mode == "" {
		mode = tlsVerifyFull
	}
	if mode == tlsDisable {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.ca_file %s: no PEM certificates", c.CAFile)
		}
		cfg.RootCAs = pool
		if mode == tlsRequire {
			mode = tlsVerifyCA
		}
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load tls client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	switch mode {
	case tlsVerifyFull:
		// crypto/tls verifies the chain and the name.
	case tlsVerifyCA:
		// Chain only, no name: Go has no such mode, so skip its check and
		// verify the chain ourselves.
		cfg.InsecureSkipVerify = true // verify-ca: chain checked in VerifyConnection
		roots := cfg.RootCAs
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyChain(cs, roots)
		}
	case tlsRequire:
		cfg.InsecureSkipVerify = true // mode require: encryption without verification, as libpq
	default:
		return nil, fmt.Errorf("unknown tls.mode %q", c.Mode)
	}
	return cfg, nil
}

// verifyChain checks the peer's chain against roots (nil: system roots)
// without checking the host name.
func verifyChain(cs tls.ConnectionState, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
	return err
}

// dialUpstream opens a connection to the upstream and, unless TLS is
// disabled, negotiates TLS with SSLRequest. A server that declines TLS is an
// error: there is never a fallback to cleartext.
func (h *Handler) dialUpstream(ctx context.Context) (net.Conn, error) {
	d := net.Dialer{KeepAlive: h.keepAlive}
	conn, err := d.DialContext(ctx, "tcp", h.cfg.Upstream)
	if err != nil {
		if errors.Is(ctx.Err(), context.Canceled) {
			return nil, errShutdownHandshake()
		}
		// A dial that times out is reported as unreachable: nothing
		// accepted the connection, whatever the reason.
		return nil, newUpstreamError(failUnreachable, codeUnableToConnect, fmt.Sprintf("upstream %s unreachable", h.cfg.Upstream), err)
	}
	if h.tls == nil {
		return conn, nil
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if _, err := conn.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}); err != nil { // SSLRequest
		conn.Close()
		return nil, h.tlsError(ctx, err)
	}
	// Read exactly one byte: anything the server sends after 'S' belongs to
	// TLS, and buffering it here would let a MITM inject plaintext.
	var b [1]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		conn.Close()
		return nil, h.tlsError(ctx, err)
	}
	if b[0] != 'S' {
		conn.Close()
		return nil, newUpstreamError(failTLS, codeUnableToConnect,
			fmt.Sprintf("upstream %s does not accept TLS (tls.mode %s); not sending the credential in cleartext", h.cfg.Upstream, h.tlsMode()), nil)
	}
	tc := tls.Client(conn, h.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, h.tlsError(ctx, err)
	}
	return tc, nil
}

func (h *Handler) tlsMode() string {
	if h.cfg.TLS.Mode == "" {
		return tlsVerifyFull
	}
	return h.cfg.TLS.Mode
}

// tlsError is a failure of the SSLRequest exchange or the TLS handshake.
// The upstream running out of time is a timeout, whichever of the
// connection deadline and the context noticed first.
func (h *Handler) tlsError(ctx context.Context, err error) error {
	if to := h.handshakeTimeout(ctx, err, "TLS handshake"); to != nil {
		return to
	}
	return newUpstreamError(failTLS, codeUnableToConnect, fmt.Sprintf("upstream %s TLS handshake failed (tls.mode %s)", h.cfg.Upstream, h.tlsMode()), err)
}

// handshakeTimeout returns the error for a handshake step (after the TCP
// connection is up) that ended because its time ran out or credproxy is
// shutting down, or nil when err has another cause. A step is bounded
// both by the connection's deadline and by ctx, which closes the
// connection when it ends: whichever fires first, a read sees
// os.ErrDeadlineExceeded, a context error or net.ErrClosed. One cause,
// reported one way: kind timeout (or shutdown), never a protocol or TLS
// error. err is nil when the step succeeded but ctx ended just after.
func (h *Handler) handshakeTimeout(ctx context.Context, err error, step string) error {
	cut := isTimeout(err) || errors.Is(err, context.Canceled) ||
		(ctx.Err() != nil && (err == nil || errors.Is(err, net.ErrClosed)))
	switch {
	case !cut:
		return nil
	case errors.Is(ctx.Err(), context.Canceled) || errors.Is(err, context.Canceled):
		return errShutdownHandshake()
	}
	return newUpstreamError(failTimeout, codeUnableToConnect,
		fmt.Sprintf("upstream %s did not complete the %s within connect_timeout %s", h.cfg.Upstream, step, h.cfg.ConnectTimeout.D()), nil)
}

// errShutdownHandshake ends a handshake that credproxy's shutdown cut short.
func errShutdownHandshake() error {
	return newUpstreamError(failShutdown, codeAdminShutdown, "terminating connection because credproxy is shutting down", nil)
}

// upstream is an authenticated upstream session, up to ReadyForQuery.
type upstream struct {
	conn     net.Conn
	rd       *bufio.Reader
	params   []*pgproto3.ParameterStatus
	notices  []*pgproto3.NoticeResponse
	key      *pgproto3.BackendKeyData // nil when the upstream sent none
	txStatus byte
	// born is when the connection was opened (pool.max_lifetime); st, for
	// a backend from the pool, is its read side with what it buffered;
	// gate orders cancels with its return to the pool (pool.go).
	born time.Time
	st   *stream
	gate *sync.RWMutex
}

// login sends the StartupMessage, answers the upstream's authentication
// request with the injected credential and reads up to ReadyForQuery.
func (h *Handler) login(conn net.Conn, user string, password credentials.Secret, params map[string]string) (*upstream, error) {
	rd := bufio.NewReaderSize(conn, 4096)
	fe := newBackendConn(&cappedReader{r: rd, max: maxHandshakeMessage}, conn)
	if err := fe.Send(&pgproto3.StartupMessage{ProtocolVersion: protocol30, Parameters: params}); err != nil {
		return nil, h.protoError("send startup", err)
	}
	up := &upstream{conn: conn, rd: rd}
	authenticated := false
	for {
		msg, err := fe.Receive()
		if err != nil {
			return nil, h.protoError("read", err)
		}
		switch m := msg.(type) {
		case *pgproto3.AuthenticationOk:
			authenticated = true
		case *pgproto3.AuthenticationCleartextPassword:
			err = fe.Send(&pgproto3.PasswordMessage{Password: password.Reveal()})
		case *pgproto3.AuthenticationMD5Password:
			err = fe.Send(&pgproto3.PasswordMessage{Password: md5Password(user, password.Reveal(), m.Salt)})
		case *pgproto3.AuthenticationSASL:
			err = h.scramSHA256(fe, m.AuthMechanisms, user, password)
		case *pgproto3.AuthenticationGSS, *pgproto3.AuthenticationGSSContinue:
			return nil, newUpstreamError(failAuth, codeInvalidAuthorization,
				fmt.Sprintf("upstream %s requested GSSAPI/SSPI authentication, which credproxy does not support", h.cfg.Upstream), nil)
		case *pgproto3.ParameterStatus:
			up.params = append(up.params, &pgproto3.ParameterStatus{Name: m.Name, Value: m.Value})
		case *pgproto3.NoticeResponse:
			n := *m
			up.notices = append(up.notices, &n)
		case *pgproto3.BackendKeyData:
			up.key = &pgproto3.BackendKeyData{ProcessID: m.ProcessID, SecretKey: m.SecretKey}
		case *pgproto3.ReadyForQuery:
			if !authenticated {
				return nil, h.protoError("handshake", errors.New("ReadyForQuery before authentication"))
			}
			up.txStatus = m.TxStatus
			return up, nil
		case *pgproto3.ErrorResponse:
			return nil, h.upstreamRejected(m, password)
		default:
			return nil, h.protoError("handshake", fmt.Errorf("unexpected %T", msg))
		}
		if err != nil {
			return nil, err
		}
	}
}

// upstreamRejected turns an ErrorResponse received during the handshake into
// the error the client sees: auth failures (class 28) say the injected
// credential was refused; anything else (no such database, too many
// connections, starting up) is passed on as the upstream said it.
//
// What the upstream says is scrubbed of the password: a hostile upstream
// that was sent it must not make credproxy show it to the app.
func (h *Handler) upstreamRejected(m *pgproto3.ErrorResponse, password credentials.Secret) error {
	if strings.HasPrefix(m.Code, "28") { // invalid authorization / password
		return newUpstreamError(failAuth, m.Code,
			fmt.Sprintf("upstream rejected the injected credential %q (upstream said: %s)", h.cfg.Credentials, m.Message), nil, password.Reveal())
	}
	resp := *m
	resp.Severity, resp.SeverityUnlocalized = "FATAL", "FATAL"
	for _, f := range []*string{&resp.Message, &resp.Detail, &resp.Hint, &resp.Where} {
		*f = scrub(*f, password.Reveal())
	}
	e := newUpstreamError(failRefused, m.Code, "upstream: "+resp.Message, nil)
	e.resp = &resp
	return e
}

func (h *Handler) protoError(op string, err error) error {
	return newUpstreamError(failProtocol, codeUnableToConnect, fmt.Sprintf("upstream %s handshake failed (%s)", h.cfg.Upstream, op), err)
}

// md5Password is PostgreSQL's MD5 response: "md5" + md5(md5(password+user) + salt).
func md5Password(user, password string, salt [4]byte) string {
	inner := md5.Sum([]byte(password + user))
	h := md5.New()
	h.Write([]byte(hex.EncodeToString(inner[:])))
	h.Write(salt[:])
	return "md5" + hex.EncodeToString(h.Sum(nil))
}

// scramSHA256 runs the SASL exchange. The server's final signature is
// verified, so an upstream that does not know the password cannot pass.
func (h *Handler) scramSHA256(fe *backendConn, mechs []string, user string, password credentials.Secret) error {
	if !contains(mechs, "SCRAM-SHA-256") {
		return newUpstreamError(failAuth, codeInvalidAuthorization,
			fmt.Sprintf("upstream %s offered SASL mechanisms %v; credproxy supports SCRAM-SHA-256 only", h.cfg.Upstream, mechs), nil)
	}
	client, err := h.scram.client(user, password)
	if err != nil {
		return newUpstreamError(failAuth, codeInvalidAuthorization, "prepare SCRAM", err, password.Reveal())
	}
	conv := client.NewConversation()
	first, err := conv.Step("")
	if err != nil {
		return newUpstreamError(failAuth, codeInvalidAuthorization, "SCRAM", err, password.Reveal())
	}
	if err := fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte(first)}); err != nil {
		return h.protoError("send SASL", err)
	}
	for !conv.Done() {
		msg, err := fe.Receive()
		if err != nil {
			return h.protoError("read SASL", err)
		}
		var challenge []byte
		switch m := msg.(type) {
		case *pgproto3.AuthenticationSASLContinue:
			challenge = m.Data
		case *pgproto3.AuthenticationSASLFinal:
			challenge = m.Data
		case *pgproto3.ErrorResponse:
			return h.upstreamRejected(m, password)
		default:
			return h.protoError("SASL", fmt.Errorf("unexpected %T", msg))
		}
		resp, err := conv.Step(string(challenge))
		if err != nil {
			return newUpstreamError(failAuth, codeInvalidAuthorization, fmt.Sprintf("upstream %s failed SCRAM verification", h.cfg.Upstream), err, password.Reveal())
		}
		if conv.Done() {
			break
		}
		if err := fe.Send(&pgproto3.SASLResponse{Data: []byte(resp)}); err != nil {
			return h.protoError("send SASL", err)
		}
	}
	if !conv.Valid() {
		return newUpstreamError(failAuth, codeInvalidAuthorization, fmt.Sprintf("upstream %s sent an invalid SCRAM server signature", h.cfg.Upstream), nil)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// scramCache keeps one scram.Client per credential. The client caches the
// salted password per (salt, iterations), so PBKDF2 runs once per credential
// rather than once per connection, as PgBouncer does.
type scramCache struct {
	mu      sync.Mutex
	clients map[[32]byte]*scram.Client
}

// maxScramClients bounds the cache; rotation adds one entry per credential.
const maxScramClients = 64

func (c *scramCache) client(user string, password credentials.Secret) (*scram.Client, error) {
	key := sha256.Sum256([]byte(user + "\x00" + password.Reveal()))
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.clients[key]; ok {
		return cl, nil
	}
	// PostgreSQL ignores the SCRAM user name (the startup packet's counts).
	cl, err := scram.SHA256.NewClient("", password.Reveal(), "")
	if err != nil {
		// As PostgreSQL does, use the raw password when SASLprep rejects it.
		cl, err = scram.SHA256.NewClientUnprepped("", password.Reveal(), "")
		if err != nil {
			return nil, err
		}
	}
	if c.clients == nil || len(c.clients) >= maxScramClients {
		c.clients = make(map[[32]byte]*scram.Client)
	}
	c.clients[key] = cl
	return cl, nil
}
