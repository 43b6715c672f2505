// Package postgres speaks the PostgreSQL wire protocol on both sides of
// credproxy: it accepts an app's connection without a password, logs in to the
// upstream with an injected credential (SCRAM-SHA-256, MD5, cleartext or
// trust, over TLS by default), hands the session over with a proxy-issued
// cancel key, and relays bytes until either side ends.
package postgres

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
	"github.com/credproxy/credproxy/proxy/limit"
)

// Options configure a Handler.
type Options struct {
	Service      config.Postgres
	Credentials  proxy.Credentials
	Audit        audit.Sink
	AuditQueries bool
	// Cancels maps the cancel keys apps are given to their backends; nil
	// gives the handler a registry of its own. Protocol shares one between
	// every service.
	Cancels *CancelRegistry
	Logger  *zap.Logger
	Metrics *proxy.Metrics // nil: not counted
	// Limits counts the listener's handshakes and sessions against
	// Service.MaxHandshakes and Service.MaxSessions (0: no limit). The
	// engine shares one between the handlers a reload swaps, so the
	// counts carry over; nil gives the handler counters of its own.
	Limits *limit.Listener
	// Budget is the process's open-file budget (nil: none), which every
	// app connection takes a place in for as long as it is open.
	Budget *limit.Budget
	// Workload is the pod this handler serves in DaemonSet mode: each
	// connection is admitted by it and each record carries it. Nil
	// otherwise.
	Workload *proxy.WorkloadPolicy
}

// Handler serves app connections for one configured Postgres service.
type Handler struct {
	cfg          config.Postgres
	creds        proxy.Credentials
	audit        audit.Sink
	auditQueries bool
	cancels      *CancelRegistry
	log          *zap.Logger
	obs          *proxy.Metrics // counts sessions; nil-safe
	limits       *limit.Listener
	budget       *limit.Budget
	workload     *proxy.WorkloadPolicy
	auditWL      *audit.Workload

	tls       *tls.Config // to the upstream; nil for mode disable
	clientTLS *tls.Config // offered to apps; nil when not configured
	keepAlive time.Duration
	scram     scramCache
	pool      *serverPool // nil: every session logs in anew
}

// NewHandler checks and loads the service's TLS material.
func NewHandler(o Options) (*Handler, error) {
	h := &Handler{
		cfg:          o.Service,
		creds:        o.Credentials,
		audit:        o.Audit,
		auditQueries: o.AuditQueries,
		cancels:      o.Cancels,
		log:          o.Logger,
		obs:          o.Metrics,
		limits:       o.Limits,
		budget:       o.Budget,
		workload:     o.Workload,
		auditWL:      o.Workload.AuditWorkload(),
		keepAlive:    30 * time.Second,
	}
	if h.limits == nil {
		h.limits = &limit.Listener{}
	}
	if h.audit == nil {
		h.audit = audit.Discard{}
	}
	if h.log == nil {
		h.log = zap.NewNop()
	}
	if h.cancels == nil {
		h.cancels = NewCancelRegistry()
	}
	if h.cfg.StartupTimeout == 0 {
		h.cfg.StartupTimeout = config.Duration(10 * time.Second)
	}
	if h.cfg.ConnectTimeout == 0 {
		h.cfg.ConnectTimeout = config.Duration(10 * time.Second)
	}
	if h.cfg.Pool != nil {
		h.pool = newServerPool(h, *h.cfg.Pool)
	}
	var err error
	if h.tls, err = upstreamTLSConfig(h.cfg.TLS, h.cfg.TLSServerName()); err != nil {
		return nil, fmt.Errorf("postgres %s: %w", h.cfg.Name, err)
	}
	if ct := h.cfg.ClientTLS; ct != nil && ct.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(ct.CertFile, ct.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("postgres %s: load client_tls certificate: %w", h.cfg.Name, err)
		}
		h.clientTLS = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	}
	return h, nil
}

// Name is the service name.
func (h *Handler) Name() string { return h.cfg.Name }

// session is one app connection's state.
type session struct {
	h      *Handler
	id     string
	start  time.Time
	log    *zap.Logger
	client *proxy.CountingConn
	raw    net.Conn // the app's connection, or its TLS layer
	rd     *bufio.Reader

	clientInfo       audit.Client
	started          bool // handed over to the app: SessionEnded is owed
	handshaking      bool // holds a max_handshakes place
	slot             bool // holds a max_sessions place
	database, dbUser string
	// replication is the app's replication request: "physical",
	// "logical" (see replicationMode) or "" for an ordinary session.
	replication string

	// appPID is the process id the app was given (BackendKeyData); cancel
	// is its cancel key's entry, which a migration points at the new
	// backend.
	appPID uint32
	cancel *cancelEntry
	// poolSlot: the session's backend holds a place in the pool; reused:
	// it came from the pool.
	poolSlot, reused bool
	poolCred         *credentials.Credential // the credential it got from the pool's view
	credName         string                  // the credential's name, once established
}

// ServeConn serves one app connection until it ends, and closes it. It
// returns the session's error (nil for a clean end or a cancel request);
// the error has already been reported to the app, audited and logged.
// Cancelling ctx closes the session at once.
func (h *Handler) ServeConn(ctx context.Context, conn net.Conn, id string) error {
	cc := proxy.NewCountingConn(conn)
	s := &session{
		h: h, id: id, start: time.Now(), client: cc, raw: cc,
		clientInfo: audit.Client{Addr: identity.ClientAddr(conn), Identity: identity.Peer(conn)},
	}
	s.log = h.log.With(zap.String("session_id", id), zap.String("client", s.clientInfo.Addr))
	if s.clientInfo.Identity != "" {
		s.log = s.log.With(zap.String("identity", s.clientInfo.Identity))
	}
	defer conn.Close()
	// Over the open-file budget: refuse at once, before this connection
	// can take an upstream descriptor, so that the process never runs out
	// (an accept or a dial failing for want of one leaves the app without
	// an answer, and the admin server without its reserve).
	if !h.budget.TryAcquire() {
		return s.refuseAtOnce(&tooManyError{key: "open-file budget", limit: h.budget.Max(), reason: RefusedOpenFiles})
	}
	defer h.budget.Release()
	// Over max_handshakes: refuse at once, reading nothing, so a flood of
	// connections that never finish their startup holds nothing.
	if !h.limits.Handshakes.TryAcquire(h.cfg.MaxHandshakes) {
		return s.refuseAtOnce(&tooManyError{key: "max_handshakes", limit: h.cfg.MaxHandshakes, reason: RefusedMaxHandshakes})
	}
	s.handshaking = true
	defer s.leaveHandshake()
	s.rd = bufio.NewReaderSize(cc, 1024)
	err := s.run(ctx)
	s.dropPoolSlot()
	if s.slot {
		h.limits.Sessions.Release()
	}
	return err
}

// leaveHandshake gives back the max_handshakes place, once.
func (s *session) leaveHandshake() {
	if s.handshaking {
		s.handshaking = false
		s.h.limits.Handshakes.Release()
	}
}

// tooManyError is a connection over max_sessions or max_handshakes.
type tooManyError struct {
	key    string // max_sessions | max_handshakes | open-file budget
	limit  int
	reason string // the metric reason
}

func (e *tooManyError) Error() string {
	return fmt.Sprintf("sorry, too many clients already: %s %d reached", e.key, e.limit)
}

// refuseAtOnce answers a connection over max_handshakes or the open-file
// budget (err says which) with FATAL 53300,
// audits and counts it. The connection holds no handshake place: while
// one of the listener's few lingering places is free, the FATAL follows
// the client's startup packet (or a second's silence), as PostgreSQL
// sends it; past those it is sent at once, reading nothing.
func (s *session) refuseAtOnce(err *tooManyError) error {
	h := s.h
	resp, kind := clientError(err)
	msg, _ := resp.Encode(nil)
	rec := s.record(audit.EventDenied)
	rec.Reason = kind.reason()
	rec.Error = audit.String(resp.Message)
	rec.SQLState = resp.Code
	h.audit.Record(rec)
	h.denied(kind)
	h.obs.Refused(protocolName, h.cfg.Name, err.reason)
	if ce := s.log.Check(zap.DebugLevel, "session refused"); ce != nil {
		ce.Write(zap.String("reason", kind.reason()), zap.String("sqlstate", resp.Code), zap.String("error", resp.Message))
	}
	conn := s.client.Conn
	release, ok := h.limits.Linger()
	if !ok {
		h.limits.Refuse(conn, msg) // closes at once
		return err
	}
	defer release()
	readStartupBriefly(conn)
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = conn.Write(msg)
	return err
}

// readStartupBriefly reads, for at most limit.LingerFor, up to a
// client's startup packet, answering SSLRequest and GSSENCRequest with
// 'N': libpq shows an error that arrives in place of the answer to its
// SSLRequest only as "server sent an error response during SSL exchange",
// and an error after the startup packet is what PostgreSQL sends.
func readStartupBriefly(conn net.Conn) {
	_ = conn.SetDeadline(time.Now().Add(limit.LingerFor))
	rd := bufio.NewReaderSize(conn, 512)
	for range 3 {
		p, err := readStartupPacket(rd)
		if err != nil || (p.code != sslRequestCode && p.code != gssEncRequestCode) || rd.Buffered() > 0 {
			return
		}
		if _, err := conn.Write([]byte{'N'}); err != nil {
			return
		}
	}
}

// takeSession takes a max_sessions place once the startup packet is in,
// as PostgreSQL checks max_connections, or returns the refusal.
func (s *session) takeSession() error {
	h := s.h
	if !h.limits.Sessions.TryAcquire(h.cfg.MaxSessions) {
		h.obs.Refused(protocolName, h.cfg.Name, RefusedMaxSessions)
		return &tooManyError{key: "max_sessions", limit: h.cfg.MaxSessions, reason: RefusedMaxSessions}
	}
	s.slot = true
	return nil
}

func (s *session) run(ctx context.Context) error {
	h := s.h
	// Until the relay takes over, shutdown closes the socket outright: that
	// is what unblocks every handshake read and write.
	stopHandshake := context.AfterFunc(ctx, func() { s.client.Close() })
	defer stopHandshake()
	_ = s.raw.SetDeadline(time.Now().Add(h.cfg.StartupTimeout.D()))
	params, out, err := s.readStartup(ctx)
	if err != nil || params == nil {
		return err
	}
	// DaemonSet mode: the connection must come from the socket's pod, and
	// the pod must be allowed the service.
	if err := h.workload.Admit(s.client.Conn); err != nil {
		return s.deny(err, out)
	}
	if err := h.workload.Allowed(h.cfg.Name); err != nil {
		return s.deny(err, out)
	}
	if err := s.takeSession(); err != nil {
		return s.deny(err, out)
	}

	params["database"] = s.database
	login := s.login
	if h.pool != nil && s.replication == "" { // a walsender is never pooled
		login = s.loginPooled
	}
	handle, up, err := login(ctx, params)
	if err != nil {
		return s.deny(err, out)
	}
	relayed := false // from then on the relay owns the backend and the credential
	defer func() {
		if !relayed {
			handle.Release()
			up.conn.Close()
		}
	}()

	// Hand over: everything the app needs in one write.
	s.cancel = h.cancels.issue(cancelTarget{h: h, key: derefKey(up.key), has: up.key != nil, gate: up.cancelGate()})
	defer s.cancel.unregister()
	key := s.cancel.key
	s.appPID = key.ProcessID
	// From here on shutdown ends the session with a FATAL at a message
	// boundary (see relay) rather than by closing the socket.
	if !stopHandshake() {
		return s.end(errors.New("closed by shutdown during handshake"))
	}
	// Established: the handshake place is free before the app can see
	// ReadyForQuery and open its next connection.
	s.leaveHandshake()
	out = s.appendHandover(out, up, &key)
	_ = s.raw.SetDeadline(time.Now().Add(h.cfg.StartupTimeout.D()))
	if _, err := s.raw.Write(out); err != nil {
		return s.end(fmt.Errorf("send handover: %w", err))
	}
	_ = s.raw.SetDeadline(time.Time{})

	rec := s.record(audit.EventSessionStart)
	rec.Upstream = h.cfg.Upstream
	rec.Database = s.database
	rec.DBUser = s.dbUser
	rec.Credential = handle.Name
	rec.Replication = s.replication
	if up.key != nil {
		rec.BackendPID = int64(up.key.ProcessID) // the app's too: see CancelRegistry.issue
	}
	if l := handle.Lease(); l.Leased() {
		rec.Lease = &audit.Lease{IDSHA256: l.IDHash(), TTLSecs: int64(time.Until(l.Expiry()).Seconds())}
	}
	if h.pool != nil {
		rec.BackendReused = &s.reused
	}
	h.audit.Record(rec)
	s.started = true
	h.obs.SessionStarted(protocolName, h.cfg.Name)
	s.credName = handle.Name
	// One info line per session, at its end, carries these too; the start
	// is in the audit log, and in the log at debug.
	if ce := s.log.Check(zap.DebugLevel, "session started"); ce != nil {
		ce.Write(s.startFields()...)
	}

	relayed = true
	return s.end(newRelay(s, up, handle, params).run(ctx))
}

// login acquires the service's credential and logs in upstream with it. A
// leased credential the upstream refuses (revoked out of band) is dropped
// and a fresh one tried once, so the app does not see the failure.
func (s *session) login(ctx context.Context, params map[string]string) (*credentials.Handle, *upstream, error) {
	for attempt := 0; ; attempt++ {
		handle, err := s.acquire(ctx)
		if err != nil {
			return nil, nil, err
		}
		up, err := s.loginWith(ctx, handle, params)
		if err == nil {
			return handle, up, nil
		}
		handle.Release()
		if attempt == 0 && handle.Credential.Lease.Leased() && kindOf(err).freshCredentialMayHelp() {
			s.log.Warn("upstream refused a leased credential; retrying with a fresh one", zap.Error(err))
			handle.Invalidate()
			continue
		}
		return nil, nil, err
	}
}

// acquire gets the service's credential and checks it has what Postgres needs.
func (s *session) acquire(ctx context.Context) (*credentials.Handle, error) {
	h := s.h
	fctx, cancel := context.WithTimeout(ctx, h.cfg.ConnectTimeout.D())
	defer cancel()
	handle, err := h.creds.Acquire(fctx, h.cfg.Credentials)
	if err != nil {
		// The store's errors are scrubbed when built (credentials.Error).
		return nil, newUpstreamError(failCredential, codeConnectionFailure, err.Error(), nil)
	}
	for _, f := range []string{"username", "password"} {
		if _, ok := handle.Credential.Field(f); !ok {
			handle.Release()
			return nil, newUpstreamError(failCredential, codeConnectionFailure,
				fmt.Sprintf("credential %q unavailable: it has no field %q (fields: %v)", h.cfg.Credentials, f, handle.Credential.FieldNames()), nil)
		}
	}
	return handle, nil
}

// connect dials, secures and logs in to the upstream as user within ctx's
// deadline.
func (s *session) connect(ctx context.Context, user string, password credentials.Secret, params map[string]string) (*upstream, error) {
	conn, err := s.h.dialUpstream(ctx)
	if err != nil {
		return nil, err
	}
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	up, err := s.h.login(conn, user, password, params)
	if !stop() || err != nil {
		conn.Close()
		if to := s.h.handshakeTimeout(ctx, err, "login"); to != nil {
			err = to
		}
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	up.born = time.Now()
	return up, nil
}

// appendHandover encodes AuthenticationOk, the upstream's ParameterStatus and
// notices, the proxy-issued BackendKeyData and ReadyForQuery.
func (s *session) appendHandover(dst []byte, up *upstream, key *pgproto3.BackendKeyData) []byte {
	dst, _ = (&pgproto3.AuthenticationOk{}).Encode(dst)
	for _, p := range up.params {
		dst, _ = p.Encode(dst)
	}
	for _, n := range up.notices {
		dst, _ = n.Encode(dst)
	}
	dst, _ = key.Encode(dst)
	dst, _ = (&pgproto3.ReadyForQuery{TxStatus: up.txStatus}).Encode(dst)
	return dst
}

// startFields describe an established session in its log lines.
func (s *session) startFields() []zap.Field {
	h := s.h
	fields := []zap.Field{zap.String("upstream", h.cfg.Upstream),
		zap.String("database", s.database), zap.String("db_user", s.dbUser), zap.String("credential", s.credName)}
	if h.pool != nil {
		fields = append(fields, zap.Bool("backend_reused", s.reused))
	}
	if s.replication != "" {
		fields = append(fields, zap.String("replication", s.replication))
	}
	return fields
}

// record starts an audit record for this session.
func (s *session) record(event string) *audit.Record {
	return &audit.Record{
		Event: event, SessionID: s.id, Protocol: protocolName, Service: s.h.cfg.Name,
		Client: s.clientInfo, Workload: s.h.auditWL,
	}
}

// deny reports a failure before the session started: a FATAL ErrorResponse
// to the app (after anything already pending in out), a denied record and
// a log line. It returns the error for the caller to return.
func (s *session) deny(err error, out []byte) error {
	resp, kind := clientError(err)
	reason := kind.reason()
	out, _ = resp.Encode(out)
	_ = s.raw.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = s.raw.Write(out)

	rec := s.record(audit.EventDenied)
	rec.Reason = reason
	rec.Error = audit.String(resp.Message)
	rec.SQLState = resp.Code
	rec.Upstream = s.h.cfg.Upstream
	rec.Database = s.database
	rec.DBUser = s.dbUser
	rec.Replication = s.replication
	s.h.audit.Record(rec)
	s.h.denied(kind)
	s.log.Warn("session denied", zap.String("reason", reason), zap.String("sqlstate", resp.Code), zap.String("error", resp.Message))
	return err
}

// clientError maps a failure to the ErrorResponse the app sees and its
// kind. Messages start with "credproxy: " unless the upstream's own error
// is being passed on.
func clientError(err error) (*pgproto3.ErrorResponse, failKind) {
	var (
		ue *upstreamError
		tm *tooManyError
		se *startupError
	)
	switch {
	case errors.As(err, &ue):
		if ue.resp != nil {
			return ue.resp, ue.kind
		}
		return fatal(ue.code, "credproxy: "+ue.msg), ue.kind
	case errors.As(err, &tm):
		return fatal(codeTooManyConnections, "credproxy: "+tm.Error()), failTooMany
	case errors.As(err, &se):
		return fatal(se.code, "credproxy: "+se.msg), se.failKind()
	}
	var we *proxy.WorkloadError
	if errors.As(err, &we) {
		return fatal(codeInvalidAuthorization, "credproxy: "+we.Msg), workloadKind(we)
	}
	return fatal(codeInternalError, "credproxy: "+err.Error()), failInternal
}

// end writes the session_end record and the canonical end-of-session log line.
func (s *session) end(err error) error {
	rec := s.record(audit.EventSessionEnd)
	rec.BytesIn = audit.Int64(s.client.In.Load())
	rec.BytesOut = audit.Int64(s.client.Out.Load())
	dur := time.Since(s.start)
	rec.DurationMS = audit.Int64(dur.Milliseconds())
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	rec.Error = audit.String(msg)
	var (
		te *errTerminated
		ue *upstreamEndError
	)
	switch {
	case errors.As(err, &te):
		rec.SQLState = te.resp.Code
	case errors.As(err, &ue):
		rec.SQLState = ue.sqlstate()
	}
	s.h.audit.Record(rec)
	result := "ok"
	if err != nil {
		result = "error"
	}
	if s.started {
		s.h.obs.SessionEnded(protocolName, s.h.cfg.Name, result, dur, *rec.BytesIn, *rec.BytesOut)
	}
	fields := []zap.Field{zap.String("result", result), zap.Int64("bytes_in", *rec.BytesIn), zap.Int64("bytes_out", *rec.BytesOut),
		zap.Duration("duration", dur), zap.String("error", msg)}
	if rec.SQLState != "" {
		fields = append(fields, zap.String("sqlstate", rec.SQLState))
	}
	if s.started {
		fields = append(fields, s.startFields()...)
	}
	s.log.Info("session ended", fields...)
	return err
}

// loginWith opens a new upstream connection logged in as handle's
// credential, within connect_timeout, and counts its connect time.
func (s *session) loginWith(ctx context.Context, handle *credentials.Handle, params map[string]string) (*upstream, error) {
	user, _ := handle.Credential.Field("username")
	password, _ := handle.Credential.Field("password")
	s.dbUser = user.Reveal()
	params["user"] = s.dbUser
	upCtx, cancel := context.WithTimeout(ctx, s.h.cfg.ConnectTimeout.D())
	defer cancel()
	start := time.Now()
	up, err := s.connect(upCtx, s.dbUser, password, params)
	if err == nil {
		s.h.obs.UpstreamConnected(protocolName, s.h.cfg.Name, time.Since(start))
	}
	return up, err
}
