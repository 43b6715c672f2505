package postgres

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// maxAuditSQL is how much of one statement the audit log keeps; the rest of
// the message is streamed to the upstream and the record marked truncated.
const maxAuditSQL = 1 << 20

// maxSettingScan is how much of a statement is searched for the names of
// custom settings a migration must carry (SET app.tenant = …).
const maxSettingScan = 8 << 10

// boundaryWait bounds how long a terminating session waits for the upstream
// to finish the message it is in the middle of.
const boundaryWait = time.Second

// relay carries an established session: the app's messages to the backend
// and the backend's to the app, each direction on its own goroutine, until
// either side ends. It follows the framing of both directions (see
// frames.go) so that it can
//   - end the session with a FATAL at a message boundary (shutdown, a
//     credential's end), as PostgreSQL does;
//   - know when the backend is idle outside a transaction with nothing of
//     the app's in flight, the one moment a migration may put another
//     backend in its place (see migrate.go);
//   - show the app a consistent process id in its own notifications.
//
// Idle, a session holds two goroutines and a small buffer per direction.
type relay struct {
	s      *session
	client net.Conn // the app's connection, or its TLS layer
	in     *stream  // reads the app
	params map[string]string

	mu       sync.Mutex
	up       *backend
	pending  int  // sync points forwarded whose ReadyForQuery has not come back
	unsynced int  // messages in flight after the last sync point
	midIn    bool // the app is in the middle of a message
	tx       byte // status of the last ReadyForQuery
	closing  bool // the app sent Terminate
	hold     *hold
	shown    map[string]string // ParameterStatus values the app has seen
	custom   map[string]bool   // names of custom settings the app may have set

	finished  bool // the relay ended: no migration starts
	migrating bool // a migration runs
	// again: the deadline of a retirement that came while a migration ran
	// (the credential it moved to, retired at once); it starts the next.
	again   time.Time
	retired bool // the credential was retired: the session was to move
	// detaching: the app ended where its backend may go back to the pool,
	// and the backend's copy is asked to stop without closing it;
	// detached: it did, at a clean point (pool.go).
	detaching, detached bool

	// handedBack: the relay is done with its backend, which recycle resets
	// for the pool or closes. From then on no callback of the relay's (the
	// shutdown's terminate and cut, the credential's end, a migration)
	// touches it; touching counts those doing so until then (withBackend).
	handedBack bool
	touching   sync.WaitGroup

	term   atomic.Pointer[pgproto3.ErrorResponse] // end the session with this at the next boundary
	termCh chan struct{}                          // closed when term is set
	done   chan struct{}                          // closed when the relay ends
	wg     sync.WaitGroup                         // a migration in progress

	out int64 // bytes written to the app (toClient's)
}

// backend is one upstream connection and the credential it logged in with.
type backend struct {
	*upstream
	rd     *stream
	handle *credentials.Handle
	scan   backendScan
	user   string
}

// hold is a migration's claim on the session. The upstream copy parks at
// an idle point (closing parked) and both copies wait for done.
type hold struct {
	parked   chan struct{}
	done     chan struct{}
	isParked bool
}

func newRelay(s *session, up *upstream, handle *credentials.Handle, params map[string]string) *relay {
	client := s.raw
	if client == net.Conn(s.client) {
		client = s.client.Conn // the relay counts its own bytes
	}
	r := &relay{
		s: s, client: client, params: params,
		tx:     up.txStatus,
		shown:  make(map[string]string, len(up.params)),
		termCh: make(chan struct{}),
		done:   make(chan struct{}),
	}
	for _, p := range up.params {
		r.shown[p.Name] = p.Value
	}
	// What the handshake read ahead on either side goes first.
	r.in = newStream(client, buffered(s.rd))
	s.rd = nil
	r.up = r.newBackend(up, handle, s.dbUser)
	return r
}

// buffered returns what rd has read and not handed out.
func buffered(rd interface {
	Buffered() int
	Peek(int) ([]byte, error)
}) []byte {
	if rd == nil {
		return nil
	}
	b, _ := rd.Peek(rd.Buffered())
	return append([]byte(nil), b...)
}

func (r *relay) newBackend(up *upstream, handle *credentials.Handle, user string) *backend {
	b := &backend{upstream: up, handle: handle, user: user}
	if up.st != nil { // from the pool, with what it buffered
		b.rd, up.st = up.st, nil
	} else {
		b.rd = newStream(up.conn, buffered(up.rd))
	}
	up.rd = nil
	if up.key != nil {
		b.scan.ownPID = up.key.ProcessID
	}
	b.scan.appPID = r.s.appPID
	b.scan.onParam = r.paramSeen
	return b
}

// paramSeen records a ParameterStatus on its way to the app.
func (r *relay) paramSeen(name, value string) {
	r.mu.Lock()
	r.shown[name] = value
	r.mu.Unlock()
}

// run relays until either side ends. ctx ending (shutdown) ends the session
// with FATAL 57P01 at a message boundary; so does the credential's end.
func (r *relay) run(ctx context.Context) error {
	s := r.s
	var (
		killing sync.WaitGroup // the shutdown's callback, once it runs
		cutAt   *time.Timer    // set by it
	)
	killing.Add(1)
	stopKill := context.AfterFunc(ctx, func() {
		defer killing.Done()
		r.terminate(fatal(codeAdminShutdown, "credproxy: terminating connection because credproxy is shutting down"))
		// If the upstream cannot get to a boundary in time, cut both.
		cutAt = time.AfterFunc(2*boundaryWait, r.cut)
	})
	r.watch(r.up)

	var once sync.Once
	var firstErr error
	finish := func(side string, err error) {
		once.Do(func() {
			if err != nil {
				firstErr = fmt.Errorf("relay from %s: %w", side, err)
			}
			if side == "client" && err == nil && r.startDetach() {
				return // the backend may serve another session (pool.go)
			}
			r.cut()
		})
	}
	toClient := make(chan struct{})
	go func() {
		defer close(toClient)
		finish("upstream", r.toClient())
	}()
	finish("client", r.fromClient())
	<-toClient
	r.mu.Lock()
	r.finished = true
	r.mu.Unlock()
	close(r.done)
	r.wg.Wait() // a migration in progress gives up
	// Shutdown no longer concerns the relay: its callback either never
	// runs or has run (a termination recorded: recycle does not keep the
	// backend), and its cut is called off.
	if stopKill() {
		killing.Done()
	}
	killing.Wait()
	if cutAt != nil {
		cutAt.Stop()
	}
	up := r.handBack()
	if r.detaching {
		r.client.Close()
	}
	if !r.recycle(ctx, up) {
		up.conn.Close()
		up.handle.Release()
	}
	if r.client != s.raw { // a TLS client's bytes are counted below the TLS layer
		s.client.In.Add(r.in.read)
		s.client.Out.Add(r.out)
	}

	var (
		te *errTerminated
		ue *upstreamEndError
	)
	if errors.As(firstErr, &te) {
		return te
	}
	if !errors.As(firstErr, &ue) && up.scan.fatal != nil {
		// The backend ended the session with a FATAL; the app, having read
		// it, may have closed before the backend did.
		return &upstreamEndError{resp: up.scan.fatal}
	}
	if ctx.Err() != nil && firstErr != nil {
		return fmt.Errorf("closed by shutdown: %w", firstErr)
	}
	if errors.Is(firstErr, net.ErrClosed) {
		return nil
	}
	return firstErr
}

// cut closes both sides now: the backend only while the relay has it.
func (r *relay) cut() {
	r.client.Close()
	r.withBackend(func(up *backend) { up.conn.Close() })
}

// withBackend calls f with the session's backend, unless the relay has
// handed it back (handBack); handBack waits for an f that runs. Every
// callback that may run after the relay ended goes through it: once the
// pool owns the backend, its deadlines and its closing are the pool's.
func (r *relay) withBackend(f func(up *backend)) {
	r.mu.Lock()
	if r.handedBack {
		r.mu.Unlock()
		return
	}
	up := r.up
	r.touching.Add(1)
	r.mu.Unlock()
	defer r.touching.Done()
	f(up)
}

// handBack ends the relay's hold on its backend and returns it, once no
// callback of the relay's touches it any more (withBackend). Credential
// callbacks registered by watch may still run, until the pool registers
// its own: they find nothing to touch.
func (r *relay) handBack() *backend {
	r.mu.Lock()
	r.handedBack = true
	up := r.up
	r.mu.Unlock()
	r.touching.Wait()
	return up
}

// watch registers for the credential's retirement (the session moves) and
// its end (the session ends).
func (r *relay) watch(b *backend) {
	b.handle.OnEnd(func() {
		r.mu.Lock()
		retired := r.retired
		r.mu.Unlock()
		if retired {
			// It was to move and did not get the chance: it stayed inside a
			// transaction, or every attempt failed.
			r.s.h.obs.Migrated(r.s.h.cfg.Name, MigrationAtDeadline, 0)
		}
		r.terminate(fatal(codeAdminShutdown, "credproxy: credential lease expired"))
	})
	b.handle.OnRetire(func(deadline time.Time) {
		r.mu.Lock()
		r.retired = true
		r.mu.Unlock()
		r.startMigration(deadline)
	})
}

// terminate asks the session to end with resp, which is sent at the next
// message boundary. Only the first request counts.
func (r *relay) terminate(resp *pgproto3.ErrorResponse) {
	if r.setTerm(resp) {
		r.wake()
	}
}

// setTerm records the FATAL to end the session with; false when one was
// recorded already.
func (r *relay) setTerm(resp *pgproto3.ErrorResponse) bool {
	if !r.term.CompareAndSwap(nil, resp) {
		return false
	}
	close(r.termCh)
	return true
}

// wake makes the upstream copy's blocking read return, so it looks at a
// termination or a migration's hold.
func (r *relay) wake() {
	r.withBackend(func(up *backend) { _ = up.conn.SetReadDeadline(time.Now()) })
}

// idle reports whether the backend waits for the app, outside a
// transaction, with nothing of the app's in flight. r.mu is held.
func (r *relay) idle() bool {
	return r.pending == 0 && r.unsynced == 0 && !r.midIn && r.tx == 'I' && !r.closing
}

// fromClient copies the app's messages to the current backend.
func (r *relay) fromClient() error {
	var scan appScan
	s := r.s
	if s.h.auditQueries {
		scan.collect = maxAuditSQL
	} else {
		scan.collect = maxSettingScan
	}
	scan.onStatement = r.statement
	var rerr error
	for {
		// What the handshake read ahead goes first; then each read.
		if data := r.in.data(); len(data) > 0 {
			n, c, serr := scan.scan(data)
			r.mu.Lock()
			for r.hold != nil && r.hold.isParked {
				// A migration owns the backend: what the app sent goes to the
				// backend that comes out of it.
				h := r.hold
				r.mu.Unlock()
				<-h.done
				r.mu.Lock()
			}
			r.pending += c.syncs
			if c.syncs > 0 {
				r.unsynced = c.after
			} else {
				r.unsynced += c.after
			}
			r.midIn = !scan.atBoundary() || n < len(data)
			r.closing = r.closing || c.terminate
			up := r.up
			r.mu.Unlock()
			if c.terminate && s.poolSlot {
				// The backend may serve another session: what came before
				// Terminate goes, Terminate does not.
				if _, werr := up.conn.Write(data[:c.terminateAt]); werr != nil {
					return werr
				}
				return nil
			}
			if n > 0 {
				if _, werr := up.conn.Write(data[:n]); werr != nil {
					return werr
				}
				r.in.consume(n)
			}
			if serr != nil {
				return fmt.Errorf("app sent an %w", serr)
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			return rerr
		}
		rerr = r.in.readMore()
	}
}

// statement audits a Query or Parse and notes custom settings it sets.
func (r *relay) statement(typ byte, body []byte, truncated bool) {
	if names := customSettings(typ, body); len(names) > 0 {
		r.mu.Lock()
		if r.custom == nil {
			r.custom = make(map[string]bool)
		}
		for _, n := range names {
			if len(r.custom) < maxCustomSettings {
				r.custom[n] = true
			} else {
				r.custom[overflowSetting] = true
			}
		}
		r.mu.Unlock()
	}
	if !r.s.h.auditQueries {
		return
	}
	sql, ok := statementText(typ, body, truncated)
	if !ok {
		return // malformed: the upstream will refuse it
	}
	r.mu.Lock()
	enc := r.shown["client_encoding"]
	r.mu.Unlock()
	rec := r.s.record(audit.EventQuery)
	rec.SQL, rec.SQLBase64, rec.SQLEncoding = auditText(sql, enc, truncated)
	rec.SQLTruncated = truncated
	// Written before the statement goes on to the backend: a slow audit
	// sink holds the session back (see package audit).
	r.s.h.audit.Record(rec)
}

// toClient copies the current backend's messages to the app, ends the
// session with a FATAL at a boundary when asked, and parks for a
// migration when the backend is idle.
func (r *relay) toClient() error {
	up := r.current()
	need := 1        // bytes the scan needs buffered before it can go on
	waiting := false // a termination waits for the backend to finish a message
	for {
		var rerr error
		if r.term.Load() == nil || waiting {
			rerr = up.rd.fill(need)
		}
		if errors.Is(rerr, os.ErrDeadlineExceeded) {
			if r.isDetaching() {
				// The app ended cleanly: stop here, with what was read
				// still buffered, for the pool to reset the backend.
				r.detached = true
				return nil
			}
			// Woken for a termination or a hold, or the boundary wait ran out.
			rerr = nil
			if resp := r.term.Load(); resp != nil && waiting {
				return r.sendFatal(up, 0, up.scan.atBoundary(), resp)
			}
			if r.term.Load() == nil {
				_ = up.conn.SetReadDeadline(time.Time{})
			}
		}
		data := up.rd.data()
		n, more, c, serr := up.scan.scan(data)
		if resp := r.term.Load(); resp != nil && serr == nil {
			// What has arrived goes first; then, at a boundary, the FATAL.
			if up.scan.atBoundary() {
				return r.sendFatal(up, n, true, resp)
			}
			if !waiting {
				// Mid-message: let the backend finish it, briefly.
				waiting = true
				_ = up.conn.SetReadDeadline(time.Now().Add(boundaryWait))
			}
		}
		if c.readys > 0 {
			// Counted before the app can see them: an app that answers a
			// ReadyForQuery at once (Terminate) finds the session idle.
			r.mu.Lock()
			r.pending = max(r.pending-c.readys, 0)
			r.tx = c.tx
			r.mu.Unlock()
		}
		// A migration waiting for an idle point claims the session before
		// the ReadyForQuery that makes it idle goes to the app: an app that
		// answers at once (pgbench, a busy pool) would otherwise have its
		// next query in flight by the time this copy looked, and would
		// never move.
		var h *hold
		if serr == nil && rerr == nil && n == len(data) {
			r.mu.Lock()
			if r.hold != nil && !r.hold.isParked && r.idle() && up.scan.atBoundary() {
				h = r.hold
				h.isParked = true // the app's next message waits for the swap
			}
			r.mu.Unlock()
		}
		var werr error
		if n > 0 {
			werr = r.write(data[:n])
			up.rd.consume(n)
			if hook := testHookToClientWrote; hook != nil {
				hook()
			}
		}
		if h != nil {
			// The migration owns the backend now; afterwards it may be
			// another one.
			close(h.parked)
			<-h.done
			up = r.current()
			_ = up.conn.SetReadDeadline(time.Time{})
		}
		switch {
		case werr != nil:
			return werr
		case serr != nil:
			return fmt.Errorf("backend sent an %w", serr)
		case rerr != nil:
			return r.backendEnded(up, rerr)
		}
		need = max(more, 1)
		if h != nil {
			need = 1
		}
	}
}

// testHookToClientWrote, set by tests, runs after the backend copy wrote
// to the app: a copy preempted there, as on a busy machine.
var testHookToClientWrote func()

// isDetaching reports whether the backend's copy is to stop for the pool.
func (r *relay) isDetaching() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.detaching
}

// backendEnded is what the backend's read error err means for the
// session. After the app's Terminate the backend closing is the clean end.
// Otherwise PostgreSQL ended the session (pg_terminate_backend, a fast or
// immediate shutdown, a crash): an *upstreamEndError, with the FATAL or
// PANIC it sent, if any. Any other read error is returned as it is.
func (r *relay) backendEnded(up *backend, err error) error {
	r.mu.Lock()
	closing := r.closing
	r.mu.Unlock()
	switch {
	case up.scan.fatal != nil:
		return &upstreamEndError{resp: up.scan.fatal, err: err}
	case closing && errors.Is(err, io.EOF):
		return nil
	case errors.Is(err, io.EOF):
		return &upstreamEndError{err: err}
	}
	return err
}

// upstreamEndError is a session the backend ended without the app asking:
// an abnormal end, as a direct connection's app sees one.
type upstreamEndError struct {
	resp *pgproto3.ErrorResponse // the FATAL or PANIC the backend sent; nil when it just closed
	err  error                   // the read's error: io.EOF for a close
}

func (e *upstreamEndError) Error() string {
	if e.resp != nil {
		return fmt.Sprintf("backend ended the session: %s %s %s", e.resp.Severity, e.resp.Code, e.resp.Message)
	}
	if errors.Is(e.err, io.EOF) {
		return "backend closed the connection unexpectedly"
	}
	return "backend closed the connection unexpectedly: " + e.err.Error()
}

func (e *upstreamEndError) Unwrap() error { return e.err }

// sqlstate is the FATAL's SQLSTATE, else 08006 (connection failure), as
// for a connection lost.
func (e *upstreamEndError) sqlstate() string {
	if e.resp != nil && e.resp.Code != "" {
		return e.resp.Code
	}
	return codeConnectionFailure
}

// current is the backend the session talks to.
func (r *relay) current() *backend {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.up
}

// write sends backend bytes to the app.
func (r *relay) write(b []byte) error {
	n, err := r.client.Write(b)
	r.out += int64(n)
	return err
}

// sendFatal forwards the first n buffered bytes (up to a boundary) and
// then resp, and returns errTerminated. At a boundary resp is what
// PostgreSQL sends when it terminates a backend; mid-message (the backend
// did not get to a boundary in time) the app gets nothing more, since a
// FATAL there would be read as part of the message.
func (r *relay) sendFatal(up *backend, n int, atBoundary bool, resp *pgproto3.ErrorResponse) error {
	if n > 0 {
		if err := r.write(up.rd.data()[:n]); err != nil {
			return err
		}
		up.rd.consume(n)
	}
	if !atBoundary {
		return &errTerminated{resp: resp}
	}
	b, _ := resp.Encode(nil)
	_ = r.client.SetWriteDeadline(time.Now().Add(boundaryWait))
	if err := r.write(b); err != nil {
		return err
	}
	return &errTerminated{resp: resp}
}

// errTerminated is returned once the session was ended with a FATAL.
type errTerminated struct{ resp *pgproto3.ErrorResponse }

func (e *errTerminated) Error() string { return e.resp.Message }

// statementText extracts the SQL of a Query ('Q') or Parse ('P') body,
// as the bytes the app sent; a truncated body (over maxAuditSQL) yields
// its leading text. It refers to body.
func statementText(typ byte, body []byte, truncated bool) (sql []byte, ok bool) {
	if typ == 'P' { // skip the statement name
		i := bytes.IndexByte(body, 0)
		if i < 0 {
			return nil, false
		}
		body = body[i+1:]
	} else if typ != 'Q' {
		return nil, false
	}
	i := bytes.IndexByte(body, 0)
	switch {
	case i >= 0 && !truncated && !wellFormedTail(typ, body[i+1:]):
		return nil, false // PostgreSQL refuses the message
	case i >= 0:
		return body[:i], true
	case truncated:
		return body, true
	}
	return nil, false // not terminated: malformed
}

// wellFormedTail reports whether what follows a statement's text is what
// PostgreSQL expects there: nothing after a Query's; a Parse's parameter
// type count and that many OIDs.
func wellFormedTail(typ byte, rest []byte) bool {
	if typ == 'Q' {
		return len(rest) == 0
	}
	return len(rest) >= 2 && len(rest) == 2+4*int(binary.BigEndian.Uint16(rest))
}
