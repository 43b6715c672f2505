package postgres

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Server-connection reuse (postgres[].pool). Without a pool every app
// session logs in to the upstream and the backend ends with it. With one,
// a backend whose session ended cleanly is reset and kept, and the next
// session with the same credential and startup parameters gets it instead
// of a new TCP connection, TLS handshake, SCRAM exchange and backend fork
// (PgBouncer's session pooling).
//
// What may be reused, and when:
//
//   - Keyed by credential and lease. The key is the *credentials.Credential
//     the backend logged in with: the Store hands new sessions only its
//     current, fresh credential, so a backend of a rotated, retired or
//     ended lease can never match a new session. Idle backends also hold
//     the lease's Handle, and its OnRetire and OnEnd close them at once:
//     rotation drains the old lease's pool; its sessions in use move by
//     migration (migrate.go), and their old backends are closed.
//
//   - Keyed by the app's startup parameters too (database, application_name,
//     client_encoding, DateStyle, options, …: all but the user, which is
//     the credential's). A backend only serves an app whose startup packet
//     said exactly what the first app's did. Re-applying differing values
//     with SET, as PgBouncer does for a few of them, would not give the app
//     what a fresh backend gives it: a startup parameter is the session's
//     reset value (source "client"), so a later RESET or DISCARD ALL in the
//     new app would bring back the previous app's value, pg_settings would
//     show source "session", and "options" (-c settings, flags) cannot be
//     re-applied at all. Drivers send the same parameters on every
//     connection, so an app matches its own backends; a backend of another
//     key is closed when the bound is reached, to make room.
//
//   - Only a backend known to be idle and clean goes back: its app ended
//     (Terminate, which is not passed on, or EOF) while the backend's last
//     ReadyForQuery said idle outside a transaction, nothing of the app's
//     was in flight (no query, no unsynced extended-protocol message, no
//     COPY), the backend stream stood at a message boundary, it reported
//     no error, no migration or termination was under way, and the reset query
//     then ran without an error and ended in ReadyForQuery idle with nothing
//     else pending. Anything else — inside a transaction ('T') or a failed
//     one ('E'), an error awaiting its Sync, COPY, an unexpected message,
//     a reset that fails or times out — closes the backend. So does any
//     error the backend reported during the session, even one it recovered
//     from (ReadyForQuery idle after it): PostgreSQL rolls the statement
//     back, but an error can also be the backend's own trouble (out of
//     memory, a file it cannot read, a stale cache), which no reset query
//     shows. It costs the next session one login, and sessions with errors
//     are the exception.
//
//   - The reset is pool.reset_query (DISCARD ALL by default, PgBouncer's
//     server_reset_query): RESET ALL (back to the startup values), DEALLOCATE
//     ALL, CLOSE ALL, UNLISTEN *, temporary tables dropped, advisory locks
//     released, plans and sequences forgotten, SESSION AUTHORIZATION reset.
//
//   - ParameterStatus: the new app is handed the values the backend
//     reported last — at its login, then every ParameterStatus relayed or
//     seen during the reset — which, with the same startup parameters and
//     after RESET ALL, are what a fresh login would report, server state
//     such as in_hot_standby included.
//
//   - Cancel keys: each session gets a key of its own (the backend's PID,
//     credproxy's secret). It is voided when the session ends, and the
//     reset waits for any cancel already being forwarded with it, so a
//     late cancel of one app can never reach the next app's query.
//
//   - Replication connections (walsenders) are never pooled: they log in
//     and end as without a pool, outside its bound.
//
//   - Bounded: pool.max_server_connections counts the service's backends,
//     idle, in use and being dialled. A session that finds none free waits
//     up to pool.wait_timeout (FIFO) and is then refused with FATAL 53300.
//     Idle backends are closed after pool.idle_timeout, and any backend
//     older than pool.max_lifetime when it would go back.

// Reasons a pooled backend is closed: bounded metric label values.
const (
	PoolClosedIdle      = "idle_timeout"
	PoolClosedLifetime  = "max_lifetime"
	PoolClosedLease     = "lease"        // its credential was retired or ended
	PoolClosedStale     = "stale"        // its credential is no longer the current one
	PoolClosedEvicted   = "evicted"      // made room for a session of another key
	PoolClosedUnclean   = "unclean"      // the session left it in a state that cannot be reset
	PoolClosedReset     = "reset_failed" // the reset query failed
	PoolClosedBroken    = "broken"       // it closed or sent something while idle
	PoolClosedShutdown  = "shutdown"     // the pool closed
	PoolClosedBudget    = "open_files"   // no room in the open-file budget to keep it idle
	PoolAcquireHit      = "hit"          // an idle backend served the session
	PoolAcquireMiss     = "miss"         // a new backend was logged in
	PoolAcquireTimeout  = "timeout"      // no backend free within wait_timeout
	RefusedServerConns  = "max_server_connections"
	maxResetMessage     = 64 << 10 // one message of the reset's answer
	maxResetWait        = 5 * time.Second
	poolTerminateWait   = 100 * time.Millisecond
	poolParamsSeparator = "\x00"
)

// poolKey is what a backend can serve: a credential (and so its lease)
// and the app's startup parameters.
type poolKey struct {
	cred   *credentials.Credential
	params string
}

// startupKey is the canonical form of the startup parameters, the user
// (the credential's) left out.
func startupKey(params map[string]string) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(params)) {
		if k == "user" {
			continue
		}
		b.WriteString(k)
		b.WriteString(poolParamsSeparator)
		b.WriteString(params[k])
		b.WriteString(poolParamsSeparator)
	}
	return b.String()
}

// pooledConn is an idle backend in the pool.
type pooledConn struct {
	up     *upstream
	handle *credentials.Handle
	user   string
	key    poolKey
	idleAt time.Time
	elem   *list.Element // in serverPool.idle
	// gone: the lease's retirement or end closed it, or asks to when it
	// arrives (the callback may run before the connection is in the list).
	gone bool
}

// poolWaiter is a session waiting for a backend.
type poolWaiter struct {
	key  poolKey
	ch   chan poolGrant // buffered: the granter never blocks
	elem *list.Element
}

// poolGrant is what a waiter is given: an idle backend of its key, or a
// place to log in a new one.
type poolGrant struct {
	pc   *pooledConn
	slot bool
}

// serverPool holds one service's reusable backends.
type serverPool struct {
	h   *Handler
	cfg config.PostgresPool

	mu       sync.Mutex
	total    int        // backends that hold a place: idle, in use, being dialled
	idle     *list.List // of *pooledConn, most recently used at the back
	waiters  *list.List // of *poolWaiter, first come first served
	lastCred *credentials.Credential
	closed   bool
	wake     chan struct{} // the janitor's: the idle list changed
	janitor  bool          // the janitor runs
	stop     chan struct{} // closed by close
	wg       sync.WaitGroup
}

func newServerPool(h *Handler, cfg config.PostgresPool) *serverPool {
	if cfg.MaxServerConnections <= 0 {
		cfg.MaxServerConnections = config.DefaultPoolMaxServerConnections
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = config.Duration(config.DefaultPoolIdleTimeout)
	}
	if cfg.MaxLifetime <= 0 {
		cfg.MaxLifetime = config.Duration(config.DefaultPoolMaxLifetime)
	}
	if strings.TrimSpace(cfg.ResetQuery) == "" {
		cfg.ResetQuery = config.DefaultPoolResetQuery
	}
	if cfg.WaitTimeout <= 0 {
		cfg.WaitTimeout = h.cfg.ConnectTimeout
	}
	return &serverPool{h: h, cfg: cfg, idle: list.New(), waiters: list.New(),
		wake: make(chan struct{}, 1), stop: make(chan struct{})}
}

// get returns an idle backend of key (a hit), or a place to log in a new
// one (slot), waiting up to wait_timeout for either. A closed pool gives
// neither and no error: the session logs in and its backend is not kept.
func (p *serverPool) get(ctx context.Context, key poolKey) (pc *pooledConn, slot bool, err error) {
	h := p.h
	var doomed []*pooledConn
	defer func() { p.closeAll(doomed) }()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, false, nil
	}
	if key.cred != p.lastCred {
		// The credential changed: idle backends of the old one can never
		// be handed out again.
		p.lastCred = key.cred
		for e := p.idle.Front(); e != nil; {
			next := e.Next()
			if c := e.Value.(*pooledConn); c.key.cred != key.cred {
				doomed = append(doomed, p.removeIdle(c, PoolClosedStale))
			}
			e = next
		}
	}
	now := time.Now()
	for e := p.idle.Back(); e != nil; {
		prev := e.Prev()
		c := e.Value.(*pooledConn)
		switch {
		case c.key != key:
		case now.Sub(c.up.born) >= p.cfg.MaxLifetime.D():
			doomed = append(doomed, p.removeIdle(c, PoolClosedLifetime))
		case !connAlive(c.up.conn):
			doomed = append(doomed, p.removeIdle(c, PoolClosedBroken))
		default:
			p.removeIdle(c, "")
			h.obs.PoolConns(protocolName, h.cfg.Name, -1, 1)
			p.mu.Unlock()
			h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireHit, 0, false)
			return c, false, nil
		}
		e = prev
	}
	if p.total < p.cfg.MaxServerConnections {
		p.total++
		h.obs.PoolConns(protocolName, h.cfg.Name, 0, 1)
		p.mu.Unlock()
		h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireMiss, 0, false)
		return nil, true, nil
	}
	if e := p.idle.Front(); e != nil {
		// Full, with a backend of another key idle: close it for this one.
		doomed = append(doomed, p.removeIdle(e.Value.(*pooledConn), PoolClosedEvicted))
		p.total++
		h.obs.PoolConns(protocolName, h.cfg.Name, 0, 1)
		p.mu.Unlock()
		h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireMiss, 0, false)
		return nil, true, nil
	}
	w := &poolWaiter{key: key, ch: make(chan poolGrant, 1)}
	w.elem = p.waiters.PushBack(w)
	p.mu.Unlock()

	start := time.Now()
	timer := time.NewTimer(p.cfg.WaitTimeout.D())
	defer timer.Stop()
	var g poolGrant
	select {
	case g = <-w.ch:
	case <-timer.C:
	case <-ctx.Done():
	}
	if g.pc == nil && !g.slot {
		p.mu.Lock()
		if w.elem != nil {
			p.waiters.Remove(w.elem)
			w.elem = nil
		}
		p.mu.Unlock()
		select {
		case g = <-w.ch: // granted as the wait ended
		default:
		}
	}
	waited := time.Since(start)
	switch {
	case g.pc != nil:
		h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireHit, waited, true)
		return g.pc, false, nil
	case g.slot:
		h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireMiss, waited, true)
		return nil, true, nil
	}
	h.obs.PoolAcquired(protocolName, h.cfg.Name, PoolAcquireTimeout, waited, true)
	h.obs.Refused(protocolName, h.cfg.Name, RefusedServerConns)
	if ctx.Err() != nil {
		return nil, false, errShutdownHandshake()
	}
	return nil, false, newUpstreamError(failTooMany, codeTooManyConnections,
		fmt.Sprintf("no server connection free within %s: pool.max_server_connections %d in use",
			p.cfg.WaitTimeout.D(), p.cfg.MaxServerConnections), nil)
}

// moved notes that credential to replaced from (a session migrated), if
// from is the newest the pool knows: idle backends of other credentials
// are closed, as get does when it sees a new one.
func (p *serverPool) moved(from, to *credentials.Credential) {
	var doomed []*pooledConn
	p.mu.Lock()
	if p.lastCred == from {
		p.lastCred = to
		for e := p.idle.Front(); e != nil; {
			next := e.Next()
			if c := e.Value.(*pooledConn); c.key.cred != to {
				doomed = append(doomed, p.removeIdle(c, PoolClosedStale))
			}
			e = next
		}
	}
	p.mu.Unlock()
	p.closeAll(doomed)
}

// removeIdle takes c out of the idle list; with a reason it is counted as
// closed and its place freed (the caller closes it). p.mu is held.
func (p *serverPool) removeIdle(c *pooledConn, reason string) *pooledConn {
	p.idle.Remove(c.elem)
	c.elem = nil
	p.h.budget.Release()
	if reason != "" {
		p.h.obs.PoolClosed(protocolName, p.h.cfg.Name, reason)
		p.total--
		p.h.obs.PoolConns(protocolName, p.h.cfg.Name, -1, 0)
	}
	return c
}

// release gives back a place whose backend is gone (a failed login, a
// backend closed at the session's end), to the first waiter if any.
func (p *serverPool) release(reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if reason != "" {
		p.h.obs.PoolClosed(protocolName, p.h.cfg.Name, reason)
	}
	if e := p.waiters.Front(); e != nil && !p.closed {
		w := p.waiters.Remove(e).(*poolWaiter)
		w.elem = nil
		w.ch <- poolGrant{slot: true}
		return
	}
	p.total--
	p.h.obs.PoolConns(protocolName, p.h.cfg.Name, 0, -1)
}

// put returns a reset backend to the pool, or hands it to the first
// waiter. It owns c from then on, and closes it when it cannot keep it.
func (p *serverPool) put(c *pooledConn) {
	h := p.h
	// The lease's end or retirement closes an idle backend. Registered
	// before the backend is listed: a lease already retired calls at once.
	c.handle.OnRetire(func(time.Time) { p.drop(c, PoolClosedLease) })
	c.handle.OnEnd(func() { p.drop(c, PoolClosedLease) })

	p.mu.Lock()
	reason := ""
	switch {
	case c.gone:
		reason = PoolClosedLease
	case p.closed:
		reason = PoolClosedShutdown
	case time.Since(c.up.born) >= p.cfg.MaxLifetime.D():
		reason = PoolClosedLifetime
	case p.lastCred != nil && c.key.cred != p.lastCred:
		reason = PoolClosedStale
	}
	if reason == "" {
		if e := p.waiters.Front(); e != nil {
			w := p.waiters.Remove(e).(*poolWaiter)
			w.elem = nil
			if w.key == c.key {
				p.mu.Unlock()
				w.ch <- poolGrant{pc: c} // stays active
				return
			}
			// The first waiter wants another key: this backend makes way.
			p.mu.Unlock()
			h.obs.PoolClosed(protocolName, h.cfg.Name, PoolClosedEvicted)
			closePooled(c)
			w.ch <- poolGrant{slot: true}
			return
		}
		if !h.budget.TryAcquire() {
			// An idle backend holds a descriptor with no app connection
			// to count it: it takes a place in the open-file budget, or
			// is not kept.
			reason = PoolClosedBudget
		}
	}
	if reason == "" {
		c.idleAt = time.Now()
		c.elem = p.idle.PushBack(c)
		h.obs.PoolConns(protocolName, h.cfg.Name, 1, -1)
		p.startJanitor()
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	closePooled(c)
	p.release(reason)
}

// drop closes c if it is idle, or marks it so that it is not kept (the
// lease's callbacks).
func (p *serverPool) drop(c *pooledConn, reason string) {
	p.mu.Lock()
	c.gone = true
	if c.elem == nil {
		p.mu.Unlock()
		return
	}
	p.removeIdle(c, reason)
	p.mu.Unlock()
	closePooled(c)
}

// startJanitor starts the goroutine that closes idle backends past
// idle_timeout or max_lifetime, or wakes it. p.mu is held.
func (p *serverPool) startJanitor() {
	if p.janitor {
		select {
		case p.wake <- struct{}{}:
		default:
		}
		return
	}
	p.janitor = true
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.sweep()
	}()
}

// sweep closes idle backends as they expire, until the pool closes.
func (p *serverPool) sweep() {
	idleFor, lifetime := p.cfg.IdleTimeout.D(), p.cfg.MaxLifetime.D()
	for {
		var doomed []*pooledConn
		var next time.Time
		p.mu.Lock()
		now := time.Now()
		for e := p.idle.Front(); e != nil; {
			n := e.Next()
			c := e.Value.(*pooledConn)
			idleEnd, lifeEnd := c.idleAt.Add(idleFor), c.up.born.Add(lifetime)
			switch {
			case !now.Before(lifeEnd):
				doomed = append(doomed, p.removeIdle(c, PoolClosedLifetime))
			case !now.Before(idleEnd):
				doomed = append(doomed, p.removeIdle(c, PoolClosedIdle))
			default:
				end := minTime(idleEnd, lifeEnd)
				if next.IsZero() || end.Before(next) {
					next = end
				}
			}
			e = n
		}
		// A place freed here may be what a waiter waits for.
		for range doomed {
			if e := p.waiters.Front(); e != nil {
				w := p.waiters.Remove(e).(*poolWaiter)
				w.elem = nil
				p.total++
				p.h.obs.PoolConns(protocolName, p.h.cfg.Name, 0, 1)
				w.ch <- poolGrant{slot: true}
			}
		}
		p.mu.Unlock()
		p.closeAll(doomed)

		var timer *time.Timer
		var fire <-chan time.Time
		if !next.IsZero() {
			timer = time.NewTimer(time.Until(next))
			fire = timer.C
		}
		select {
		case <-fire:
		case <-p.wake:
		case <-p.stop:
		}
		if timer != nil {
			timer.Stop()
		}
		select {
		case <-p.stop:
			return
		default:
		}
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// close stops pooling: idle backends are closed now, and backends whose
// sessions end later are closed then. It waits for the janitor.
func (p *serverPool) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return
	}
	p.closed = true
	close(p.stop)
	var doomed []*pooledConn
	for e := p.idle.Front(); e != nil; e = p.idle.Front() {
		doomed = append(doomed, p.removeIdle(e.Value.(*pooledConn), PoolClosedShutdown))
	}
	for e := p.waiters.Front(); e != nil; e = p.waiters.Front() {
		w := p.waiters.Remove(e).(*poolWaiter)
		w.elem = nil
		// A waiter logs in on its own; its backend is not kept.
		p.total++
		p.h.obs.PoolConns(protocolName, p.h.cfg.Name, 0, 1)
		w.ch <- poolGrant{slot: true}
	}
	p.mu.Unlock()
	p.closeAll(doomed)
	p.wg.Wait()
}

func (p *serverPool) closeAll(cs []*pooledConn) {
	for _, c := range cs {
		closePooled(c)
	}
}

// closePooled ends a backend politely (Terminate, briefly) and gives its
// credential back.
func closePooled(c *pooledConn) {
	terminateBackend(c.up.conn)
	c.handle.Release()
}

// terminateBackend sends Terminate, waiting at most poolTerminateWait,
// and closes conn.
func terminateBackend(conn net.Conn) {
	if b, err := (&pgproto3.Terminate{}).Encode(nil); err == nil {
		_ = conn.SetWriteDeadline(time.Now().Add(poolTerminateWait))
		_, _ = conn.Write(b)
	}
	_ = conn.Close()
}

// Shutdown stops the service's pool: idle upstream connections are closed
// now, the others when their sessions end. It does not wait for sessions.
func (h *Handler) Shutdown(context.Context) error {
	if h.pool != nil {
		h.pool.close()
	}
	return nil
}

// Close is Shutdown; the engine calls it when the handler is replaced or
// credproxy stops. It is idempotent.
func (h *Handler) Close() error { return h.Shutdown(context.Background()) }

// loginPooled is login with a pool: an idle backend of the credential and
// the app's startup parameters if there is one, else a new login, within
// pool.max_server_connections.
func (s *session) loginPooled(ctx context.Context, params map[string]string) (*credentials.Handle, *upstream, error) {
	p := s.h.pool
	for attempt := 0; ; attempt++ {
		handle, err := s.acquire(ctx)
		if err != nil {
			return nil, nil, err
		}
		key := poolKey{cred: handle.Credential, params: startupKey(params)}
		pc, slot, err := p.get(ctx, key)
		if err != nil {
			handle.Release()
			return nil, nil, err
		}
		s.poolCred = handle.Credential
		if pc != nil {
			handle.Release() // the backend's own handle, on the same credential, serves
			s.dbUser = pc.user
			params["user"] = pc.user
			// The lease callbacks are still the pool's until the relay sets
			// its own; one that fires meanwhile only marks pc, which is not
			// kept after this session.
			s.reused, s.poolSlot = true, true
			return pc.handle, pc.up, nil
		}
		up, err := s.loginWith(ctx, handle, params)
		if err == nil {
			s.poolSlot = slot
			return handle, up, nil
		}
		if slot {
			p.release("")
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

// dropPoolSlot gives back the pool place of a session whose backend
// never reached the relay (the handover failed): run closed the backend.
func (s *session) dropPoolSlot() {
	if s.poolSlot {
		s.poolSlot = false
		s.h.pool.release(PoolClosedUnclean)
	}
}

// detachable reports whether the session may hand its backend back at
// this point: the app ended while the backend waited for it, idle outside
// a transaction, with nothing in flight and nothing being done to the
// session. r.mu is held.
func (r *relay) detachable() bool {
	return r.s.h.pool != nil && r.s.poolSlot && r.pending == 0 && r.unsynced == 0 && !r.midIn &&
		r.tx == 'I' && r.hold == nil && !r.migrating && r.term.Load() == nil
}

// startDetach stops the backend's copy without closing the backend, when
// the app ended cleanly at a point where the backend may be reused. It
// reports whether it did; otherwise the relay closes both sides.
func (r *relay) startDetach() bool {
	r.mu.Lock()
	ok := r.detachable()
	if ok {
		r.detaching = true
	}
	up := r.up
	closing := r.closing
	r.mu.Unlock()
	if !ok {
		if closing && r.s.poolSlot {
			// The app's Terminate was held back for the pool: the backend
			// gets one of its own before it is closed.
			terminateBackend(up.conn)
		}
		return false
	}
	// The app is gone: a write to it fails rather than blocks, and the
	// backend's copy wakes from its read.
	_ = r.client.SetWriteDeadline(time.Now())
	_ = up.conn.SetReadDeadline(time.Now())
	return true
}

// recycle hands the session's backend back to the pool after its relay
// ended, once it has been reset; it reports whether it took the backend
// (kept or closed it). When it returns false the caller closes the
// backend and releases its credential. The relay has handed the backend
// back (handBack) before: no callback of its own touches it any more, and
// the reset sets, then clears, the only deadline on it.
func (r *relay) recycle(ctx context.Context, up *backend) bool {
	s := r.s
	p := s.h.pool
	if p == nil || !s.poolSlot {
		return false
	}
	s.poolSlot = false
	clean := r.detached && up.scan.atBoundary() && !up.scan.failed && r.term.Load() == nil && ctx.Err() == nil
	if !clean {
		terminateBackend(up.conn)
		up.handle.Release()
		p.release(PoolClosedUnclean)
		return true
	}
	// No cancel of this session's may reach the backend once it serves
	// another: void the key, then wait for any being forwarded.
	if s.cancel != nil {
		s.cancel.unregister()
	}
	gate := up.cancelGate()
	gate.Lock()
	//lint:ignore SA2001 taking the lock waits for the cancels that hold it shared
	gate.Unlock()

	r.mu.Lock()
	params := maps.Clone(r.shown)
	r.mu.Unlock()
	if err := r.reset(up, params, p.cfg.ResetQuery); err != nil {
		if ce := s.log.Check(zap.DebugLevel, "upstream connection not reused"); ce != nil {
			ce.Write(zap.Error(err))
		}
		terminateBackend(up.conn)
		up.handle.Release()
		p.release(PoolClosedReset)
		return true
	}
	next := &upstream{conn: up.conn, st: up.rd, key: up.key, txStatus: 'I', born: up.born, gate: up.gate}
	for _, name := range slices.Sorted(maps.Keys(params)) {
		next.params = append(next.params, &pgproto3.ParameterStatus{Name: name, Value: params[name]})
	}
	key := poolKey{cred: up.handle.Credential, params: startupKey(r.params)}
	if key.cred != s.poolCred {
		// The session migrated: its backend's credential replaced the one
		// it started with.
		p.moved(s.poolCred, key.cred)
	}
	p.put(&pooledConn{up: next, handle: up.handle, user: up.user, key: key})
	return true
}

// testHookResetSent, set by tests, runs while a reset waits for the
// answer to its query: what else may happen to the backend then.
var testHookResetSent func(r *relay)

// reset runs the reset query on b and reads up to its ReadyForQuery,
// noting the ParameterStatus values it reports in params. Any error, a
// status other than idle, a message that has no place there, or bytes
// after the ReadyForQuery fail it.
func (r *relay) reset(b *backend, params map[string]string, query string) error {
	wait := min(r.s.h.cfg.ConnectTimeout.D(), maxResetWait)
	_ = b.conn.SetDeadline(time.Now().Add(wait))
	defer func() { _ = b.conn.SetDeadline(time.Time{}) }()
	msg, err := (&pgproto3.Query{String: query}).Encode(nil)
	if err != nil {
		return err
	}
	if _, err := b.conn.Write(msg); err != nil {
		return fmt.Errorf("send the reset query: %w", err)
	}
	if hook := testHookResetSent; hook != nil {
		hook(r)
	}
	cr := cappedNext{s: b.rd, max: maxResetMessage}
	var failed error
	for {
		m, err := receive(cr)
		if err != nil {
			return fmt.Errorf("read the reset query's answer: %w", err)
		}
		switch m := m.(type) {
		case *pgproto3.CommandComplete, *pgproto3.EmptyQueryResponse, *pgproto3.RowDescription, *pgproto3.DataRow,
			*pgproto3.NoticeResponse, *pgproto3.NotificationResponse:
			// A notification still queued was the app's; it has gone.
		case *pgproto3.ParameterStatus:
			params[m.Name] = m.Value
		case *pgproto3.ErrorResponse:
			if failed == nil {
				failed = fmt.Errorf("reset query failed: %s %s", m.Code, m.Message)
			}
		case *pgproto3.ReadyForQuery:
			switch {
			case failed != nil:
				return failed
			case m.TxStatus != 'I':
				return fmt.Errorf("backend in transaction status %q after the reset query", m.TxStatus)
			case len(b.rd.data()) > 0:
				return errors.New("backend sent more after the reset query")
			}
			return nil
		default:
			return fmt.Errorf("unexpected %T in answer to the reset query", m)
		}
	}
}

// cancelGate is the backend's: a forwarded cancel holds it shared, and a
// backend going back to the pool takes it alone, so that it waits for
// cancels already on their way.
func (u *upstream) cancelGate() *sync.RWMutex {
	if u.gate == nil {
		u.gate = new(sync.RWMutex)
	}
	return u.gate
}
