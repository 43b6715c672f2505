package postgres

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgproto3/v2"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Migration moves a session to a fresh credential without the app
// noticing. When the session's credential is retired (its lease reached
// its max TTL, Vault refused to renew it or revoked it, the Vault token
// that created it ends, the database refused it), the relay logs in to a
// new backend with the current credential and, at the next moment the old
// backend is idle outside a transaction with none of the app's messages in
// flight, swaps it in: it reads the session's state from the old backend,
// re-creates it on the new one, and closes the old one. The app keeps its
// socket and its cancel key, and sees at most ParameterStatus messages for
// values that differ.
//
// State is read from the backend rather than tracked on the wire: the
// backend knows exactly what holds, whatever way the app set it (SQL,
// protocol messages, functions). Two things it does not show are found in
// the app's SQL (sqlscan.go): the names of custom settings, and the PREPARE
// of a statement prepared with SQL.
//
// What is carried: settings made in the session (pg_settings with source
// session, and custom settings), SET ROLE, prepared statements (protocol
// level and SQL PREPARE, under their names and parameter types) and LISTEN
// channels. What cannot move — temporary tables, WITH HOLD cursors,
// session advisory locks, state that does not re-create — ends the
// session at an idle point with FATAL 57P01 and a message that says why,
// well before the credential's end. A session that stays inside one
// transaction until the end is the only one cut mid-transaction, then.

// Migration results: bounded metric label values. proxy.Metrics.Migrated
// records the swap time of a migration whose result is "ok".
const (
	MigrationOK         = "ok"
	MigrationUnmovable  = "ended_unmovable_state"
	MigrationAtDeadline = "ended_at_deadline"
	MigrationFailed     = "failed"
)

// maxMigrationMessage caps one message a backend sends a migration's own
// queries (a prepared statement's text can be long).
const maxMigrationMessage = 16 << 20

// minMigrationRetry is the shortest wait before another attempt; closer
// to the deadline than four times that, a migration gives up rather than
// spin on logins that cannot finish in time.
const minMigrationRetry = 50 * time.Millisecond

// errUnmovable is state that cannot move to another backend.
type errUnmovable struct{ why string }

func (e *errUnmovable) Error() string { return e.why }

// startMigration starts moving the session before deadline (OnRetire).
func (r *relay) startMigration(deadline time.Time) {
	r.mu.Lock()
	// A replication connection speaks the replication protocol, not SQL:
	// it cannot be replayed on another backend. It ends with its
	// credential, as a direct one ends when its role is dropped.
	if r.finished || r.s.replication != "" {
		r.mu.Unlock()
		return
	}
	if r.migrating {
		// The running migration may be about to land on the credential
		// just retired: it starts another one when it ends.
		r.again = deadline
		r.mu.Unlock()
		return
	}
	r.migrating = true
	r.wg.Add(1)
	r.mu.Unlock()
	go func() {
		defer r.wg.Done()
		r.migrate(deadline)
	}()
}

// migrate moves the session, trying again after failures, until it has
// moved, was ended, or deadline passes (the credential's end then ends the
// session).
func (r *relay) migrate(deadline time.Time) {
	s := r.s
	log := s.log.With(zap.Time("deadline", deadline))
	defer func() {
		r.mu.Lock()
		r.migrating = false
		again := r.again
		r.again = time.Time{}
		r.mu.Unlock()
		if !again.IsZero() {
			r.startMigration(again)
		}
	}()
	// Start migrate_before the deadline at the latest (default: now), at a
	// random point in the first third of what is left, so that a thousand
	// sessions on one credential do not log in at once.
	startAt := time.Now()
	if mb := s.h.cfg.Rotation.MigrateBefore.D(); mb > 0 {
		if t := deadline.Add(-mb); t.After(startAt) {
			startAt = t
		}
	}
	if spread := min(deadline.Sub(startAt)/3, 30*time.Second); spread > 0 {
		startAt = startAt.Add(rand.N(spread))
	}
	if !r.sleepUntil(startAt) {
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	backoff := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		if r.term.Load() != nil || r.isDone() {
			return
		}
		err := r.migrateOnce(ctx)
		var um *errUnmovable
		switch {
		case err == nil:
			return
		case errors.As(err, &um):
			r.s.h.obs.Migrated(s.h.cfg.Name, MigrationUnmovable, 0)
			return
		}
		s.h.obs.Migrated(s.h.cfg.Name, MigrationFailed, 0)
		wait := min(backoff, time.Until(deadline)/4)
		if wait < minMigrationRetry || ctx.Err() != nil {
			// Too close to the deadline for another login: the
			// credential's end ends the session.
			log.Warn("session migration failed; no time left to retry", zap.Int("attempt", attempt), zap.Error(err))
			return
		}
		log.Warn("session migration failed; will retry", zap.Int("attempt", attempt), zap.Error(err),
			zap.Duration("retry_in", wait))
		backoff = min(2*backoff, 10*time.Second)
		if !r.sleepUntil(time.Now().Add(wait)) || ctx.Err() != nil {
			return
		}
	}
}

// sleepUntil waits until t; false when the session ended or is ending.
func (r *relay) sleepUntil(t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return r.term.Load() == nil
	case <-r.done:
		return false
	}
}

func (r *relay) isDone() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// migrateOnce makes one attempt: a new backend, the next idle point, the
// state, the swap.
func (r *relay) migrateOnce(ctx context.Context) error {
	s := r.s
	h := s.h
	// Give up as soon as the session ends or is being ended.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.done:
		case <-r.termCh:
		case <-ctx.Done():
		}
		cancel()
	}()

	old := r.current()
	handle, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	if handle.Credential == old.handle.Credential {
		handle.Release()
		return errors.New("no fresh credential yet")
	}
	user, _ := handle.Credential.Field("username")
	password, _ := handle.Credential.Field("password")
	params := make(map[string]string, len(r.params))
	for k, v := range r.params {
		params[k] = v
	}
	params["user"] = user.Reveal()
	cctx, ccancel := context.WithTimeout(ctx, h.cfg.ConnectTimeout.D())
	up, err := s.connect(cctx, user.Reveal(), password, params)
	ccancel()
	if err != nil {
		handle.Release()
		if ctx.Err() != nil {
			// The deadline, not connect_timeout, cut the login short.
			return fmt.Errorf("no new backend before the deadline: %w", ctx.Err())
		}
		return err
	}
	next := r.newBackend(up, handle, user.Reveal())
	swapped := false
	defer func() {
		if !swapped {
			next.conn.Close()
			handle.Release()
		}
	}()

	// Wait for the next idle point.
	hd := &hold{parked: make(chan struct{}), done: make(chan struct{})}
	r.mu.Lock()
	r.hold = hd
	idle := r.idle()
	r.mu.Unlock()
	if idle {
		r.wake()
	}
	select {
	case <-hd.parked:
	case <-ctx.Done():
		r.mu.Lock()
		parked := hd.isParked
		r.hold = nil
		r.mu.Unlock()
		if parked {
			close(hd.done)
		}
		return fmt.Errorf("no idle point: %w", ctx.Err())
	}
	// Parked: both copies wait for hd.done; the backends are ours.
	start := time.Now()
	release := func() {
		r.mu.Lock()
		r.hold = nil
		r.mu.Unlock()
		close(hd.done)
	}
	dl, _ := ctx.Deadline()
	_ = old.conn.SetDeadline(dl)
	_ = next.conn.SetDeadline(dl)
	carried, err := r.carry(old, next)
	_ = old.conn.SetDeadline(time.Time{})
	_ = next.conn.SetDeadline(time.Time{})
	var um *errUnmovable
	if errors.As(err, &um) {
		// Now, at an idle point: not later, inside a transaction.
		s.log.Info("session ended: its state cannot move to a fresh credential", zap.String("why", um.why))
		r.setTerm(fatal(codeAdminShutdown,
			"credproxy: terminating connection because its credential is being rotated and the session holds "+um.why+
				", which cannot move to a new connection; reconnect"))
		release()
		return err
	}
	if err != nil {
		release()
		return err
	}

	// Swap.
	r.mu.Lock()
	r.up = next
	r.tx, r.pending, r.unsynced = 'I', 0, 0
	r.retired = false
	r.mu.Unlock()
	swapped = true
	if s.cancel != nil {
		s.cancel.update(cancelTarget{h: h, key: derefKey(up.key), has: up.key != nil, gate: up.cancelGate()})
	}
	next.scan.appPID = s.appPID
	release()
	took := time.Since(start)

	// The old backend goes, and with it the old credential.
	if b, err := (&pgproto3.Terminate{}).Encode(nil); err == nil {
		_ = old.conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = old.conn.Write(b)
	}
	old.conn.Close()
	fromLease, toLease := old.handle.Lease().IDHash(), handle.Lease().IDHash()
	old.handle.Release()
	if hook := testHookMigrated; hook != nil {
		hook(handle)
	}
	r.watch(next)

	rec := s.record(audit.EventSessionMigrated)
	rec.FromLeaseSHA256, rec.ToLeaseSHA256 = fromLease, toLease
	rec.DBUser = next.user
	rec.Carried = &carried
	rec.DurationMS = audit.Int64(took.Milliseconds())
	if up.key != nil {
		rec.BackendPID = int64(up.key.ProcessID)
	}
	h.audit.Record(rec)
	h.obs.Migrated(h.cfg.Name, MigrationOK, took)
	s.log.Info("session migrated to a fresh credential", zap.String("db_user", next.user),
		zap.String("from_lease_sha256", fromLease), zap.String("to_lease_sha256", toLease),
		zap.Int("settings", carried.Settings), zap.Int("prepared", carried.Prepared), zap.Int("listen", carried.Listen),
		zap.Duration("swap", took))
	return nil
}

// testHookMigrated, set by tests, runs after a swap, before the session
// watches its new credential.
var testHookMigrated func(*credentials.Handle)

func derefKey(k *pgproto3.BackendKeyData) pgproto3.BackendKeyData {
	if k == nil {
		return pgproto3.BackendKeyData{}
	}
	return *k
}

// sessionState is what a backend holds of a session.
type sessionState struct {
	settings  [][2]string // name, value: set_config on the new backend
	role      string      // SET ROLE, when not the session user
	prepared  []preparedStmt
	listen    []string
	unmovable string // why the session cannot move, if it cannot
}

type preparedStmt struct {
	name    string
	query   string   // protocol level: the statement; SQL: the PREPARE
	types   []uint32 // parameter types (protocol level)
	fromSQL bool
}

// carry reads the session's state from old and re-creates it on next, and
// passes on what each backend sends on its own meanwhile: the old one's
// notifications to the app, the new one's parameter changes.
func (r *relay) carry(old, next *backend) (audit.Carried, error) {
	var carried audit.Carried
	st, err := r.readState(old)
	if err != nil {
		return carried, fmt.Errorf("read the session's state: %w", err)
	}
	if st.unmovable != "" {
		return carried, &errUnmovable{why: st.unmovable}
	}
	shown, err := r.recreate(next, st)
	if err != nil {
		return carried, &errUnmovable{why: "state that could not be re-created (" + err.Error() + ")"}
	}
	// Notifications the old backend got until the new one listens go to
	// the app: one more round trip flushes them.
	if len(st.listen) > 0 {
		if err := r.roundTrip(old, nil, nil); err != nil {
			return carried, fmt.Errorf("drain the old backend: %w", err)
		}
	}
	// The app sees the parameters that differ.
	var out []byte
	r.mu.Lock()
	for _, p := range shown {
		if r.shown[p.Name] != p.Value {
			r.shown[p.Name] = p.Value
			out, _ = p.Encode(out)
		}
	}
	r.mu.Unlock()
	if len(out) > 0 {
		if err := r.write(out); err != nil {
			return carried, err
		}
	}
	carried = audit.Carried{Settings: len(st.settings), Prepared: len(st.prepared), Listen: len(st.listen)}
	if st.role != "" {
		carried.Settings++
	}
	return carried, nil
}

// The queries a migration runs on the old backend, in one round trip.
const (
	qSettings  = `SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session'`
	qCustom    = `SELECT n, current_setting(n, true) FROM unnest($1::text[]) AS n WHERE current_setting(n, true) IS NOT NULL`
	qPrepared  = `SELECT name, statement, parameter_types::oid[]::text, from_sql FROM pg_prepared_statements`
	qListen    = `SELECT pg_listening_channels()`
	qUnmovable = `SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
	(SELECT count(*) FROM pg_cursors WHERE is_holdable),
	(SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),
	current_setting('role')`
)

// readState reads what the old backend holds of the session.
func (r *relay) readState(old *backend) (*sessionState, error) {
	r.mu.Lock()
	custom := make([]string, 0, len(r.custom))
	overflow := false
	for n := range r.custom {
		if n == overflowSetting {
			overflow = true
			continue
		}
		custom = append(custom, n)
	}
	r.mu.Unlock()
	st := &sessionState{}
	if overflow {
		st.unmovable = "more custom settings than credproxy tracks"
		return st, nil
	}
	queries := []query{{sql: qSettings}, {sql: qPrepared}, {sql: qListen}, {sql: qUnmovable}}
	if len(custom) > 0 {
		queries = append(queries, query{sql: qCustom, args: []string{textArray(custom)}})
	}
	var rows [][][]string
	err := r.roundTrip(old, queries, func(i int, row []string) {
		for len(rows) <= i {
			rows = append(rows, nil)
		}
		rows[i] = append(rows[i], row)
	})
	if err != nil {
		return nil, err
	}
	for len(rows) < len(queries) {
		rows = append(rows, nil)
	}
	for _, row := range rows[0] {
		st.settings = append(st.settings, [2]string{row[0], row[1]})
	}
	if len(queries) > 4 {
		for _, row := range rows[4] {
			st.settings = append(st.settings, [2]string{row[0], row[1]})
		}
	}
	for _, row := range rows[1] {
		ps := preparedStmt{name: row[0], query: row[1], fromSQL: row[3] == "t"}
		if ps.fromSQL {
			sql, ok := preparedStatementSQL(row[1], row[0])
			if !ok {
				st.unmovable = fmt.Sprintf("prepared statement %q whose PREPARE credproxy cannot find", row[0])
				return st, nil
			}
			ps.query = sql
		} else {
			types, err := parseOIDArray(row[2])
			if err != nil {
				return nil, err
			}
			ps.types = types
		}
		st.prepared = append(st.prepared, ps)
	}
	for _, row := range rows[2] {
		st.listen = append(st.listen, row[0])
	}
	if len(rows[3]) == 1 {
		u := rows[3][0]
		var why []string
		for i, what := range []string{"temporary tables", "WITH HOLD cursors", "session advisory locks"} {
			if u[i] != "0" {
				why = append(why, what)
			}
		}
		if len(why) > 0 {
			st.unmovable = strings.Join(why, ", ")
			return st, nil
		}
		// The role GUC, not current_user: it reads the same after a SET
		// ROLE, and still works when Vault has dropped the session's role
		// (a revoked lease), where current_user fails.
		if u[3] != "none" {
			st.role = u[3]
		}
	}
	return st, nil
}

// recreate makes st on next, in one round trip, and returns the
// ParameterStatus values next shows at the end.
func (r *relay) recreate(next *backend, st *sessionState) ([]*pgproto3.ParameterStatus, error) {
	shown := map[string]string{}
	for _, p := range next.params {
		shown[p.Name] = p.Value
	}
	var queries []query
	for _, kv := range st.settings {
		queries = append(queries, query{sql: `SELECT set_config($1, $2, false)`, args: []string{kv[0], kv[1]}})
	}
	if st.role != "" {
		queries = append(queries, query{sql: `SELECT set_config('role', $1, false)`, args: []string{st.role}})
	}
	for _, ps := range st.prepared {
		if ps.fromSQL {
			queries = append(queries, query{sql: ps.query})
		} else {
			queries = append(queries, query{prepare: ps.name, sql: ps.query, types: ps.types})
		}
	}
	for _, ch := range st.listen {
		queries = append(queries, query{sql: "LISTEN " + quoteIdent(ch)})
	}
	if len(queries) > 0 {
		next.scan.onParam = func(name, value string) { shown[name] = value }
		err := r.roundTrip(next, queries, nil)
		next.scan.onParam = r.paramSeen
		if err != nil {
			return nil, err
		}
	}
	out := make([]*pgproto3.ParameterStatus, 0, len(shown))
	for name, value := range shown {
		out = append(out, &pgproto3.ParameterStatus{Name: name, Value: value})
	}
	return out, nil
}

// query is one statement a migration runs with the extended protocol:
// text parameters, text results. With prepare set it only prepares the
// statement under that name (a prepared statement being re-created).
type query struct {
	sql     string
	args    []string
	prepare string
	types   []uint32
}

// roundTrip runs queries on b as one pipeline ending in a Sync, and reads
// up to its ReadyForQuery. Rows go to row(query index, columns). What the
// backend sends on its own — a notification, a notice, a parameter
// change — goes to the app (the relay is parked: the app's connection is
// free). The first ErrorResponse fails the trip.
func (r *relay) roundTrip(b *backend, queries []query, row func(i int, cols []string)) error {
	fe := newBackendConn(cappedNext{s: b.rd, max: maxMigrationMessage}, b.conn)
	var buf []byte
	for _, q := range queries {
		if q.prepare != "" {
			buf, _ = (&pgproto3.Parse{Name: q.prepare, Query: q.sql, ParameterOIDs: q.types}).Encode(buf)
			continue
		}
		args := make([][]byte, len(q.args))
		for i, a := range q.args {
			args[i] = []byte(a)
		}
		buf, _ = (&pgproto3.Parse{Query: q.sql}).Encode(buf)
		buf, _ = (&pgproto3.Bind{Parameters: args}).Encode(buf)
		buf, _ = (&pgproto3.Execute{}).Encode(buf)
	}
	buf, _ = (&pgproto3.Sync{}).Encode(buf)
	if _, err := b.conn.Write(buf); err != nil {
		return err
	}
	// Queries that produce a result: CommandComplete ends each; Parse of a
	// named statement ends with ParseComplete alone.
	i := 0
	skipNamed := func() {
		for i < len(queries) && queries[i].prepare != "" {
			i++
		}
	}
	skipNamed()
	var failed error
	for {
		msg, err := fe.Receive()
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.DataRow:
			if row != nil && failed == nil {
				cols := make([]string, len(m.Values))
				for j, v := range m.Values {
					cols[j] = string(v)
				}
				row(i, cols)
			}
		case *pgproto3.CommandComplete:
			i++
			skipNamed()
		case *pgproto3.ErrorResponse:
			if failed == nil {
				failed = fmt.Errorf("%s %s", m.Code, m.Message)
			}
		case *pgproto3.NotificationResponse:
			if err := r.forward(b, m); err != nil {
				return err
			}
		case *pgproto3.NoticeResponse:
			// A notice from credproxy's own statements is not the app's.
		case *pgproto3.ParameterStatus:
			if b == r.current() {
				// The app's backend changed a value on its own: the app
				// sees it, as it would have.
				r.paramSeen(m.Name, m.Value)
				out, _ := m.Encode(nil)
				if err := r.write(out); err != nil {
					return err
				}
			} else if b.scan.onParam != nil {
				b.scan.onParam(m.Name, m.Value)
			}
		case *pgproto3.ReadyForQuery:
			if failed == nil && m.TxStatus != 'I' {
				failed = fmt.Errorf("backend left in transaction status %q", m.TxStatus)
			}
			return failed
		}
	}
}

// forward sends a notification the backend got to the app, with the app's
// process id where it names the backend itself.
func (r *relay) forward(b *backend, m *pgproto3.NotificationResponse) error {
	n := *m
	if b.scan.ownPID != 0 && n.PID == b.scan.ownPID {
		n.PID = b.scan.appPID
	}
	out, _ := n.Encode(nil)
	return r.write(out)
}

// textArray encodes names as a PostgreSQL text[] literal.
func textArray(names []string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		for _, c := range []byte(n) {
			if c == '"' || c == '\\' {
				b.WriteByte('\\')
			}
			b.WriteByte(c)
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// parseOIDArray parses an oid[] in text form, {23,25}.
func parseOIDArray(s string) ([]uint32, error) {
	s = strings.TrimSuffix(strings.TrimPrefix(s, "{"), "}")
	if s == "" {
		return nil, nil
	}
	var out []uint32
	for _, f := range strings.Split(s, ",") {
		v, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("parameter types %q: %w", s, err)
		}
		out = append(out, uint32(v))
	}
	return out, nil
}

// quoteIdent quotes a name as a PostgreSQL identifier.
func quoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}
