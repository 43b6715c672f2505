// Package audit writes credproxy's audit log: one JSON object per line, one
// record per session start, statement, request, refusal and session end.
// Records carry names, addresses, sizes and hashes, never a secret value.
//
// A record's size is bounded as written, not as handed in: the statement
// is cut so that its JSON encoding fits MaxSQLBytes, every other text
// field maxFieldBytes, so no input inflates a line (JSON escapes a control
// character as six bytes).
//
// The Writer commits in groups. A record is encoded (by hand, without
// reflection) into the batch being gathered; if no write is in flight,
// its caller writes that batch with one write(2), whole lines, O_APPEND,
// so lines never interleave. Records handed over meanwhile join the next
// batch, which the first of their callers to find the writer idle writes.
// Record returns only once its line was handed to write(2): sessions hand
// their records over synchronously, no goroutine holds records of its
// own, and a crash loses only what no Record call has returned for. When
// the audit sink is slower than the statements, the statements wait
// (backpressure to the app), and memory stays at two buffers (the batch
// in flight and the one gathered, each capped at maxBatchBytes plus one
// record; a caller finding the batch full waits) plus the record each
// waiting session holds: never a queue that grows. Nothing is dropped.
package audit

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Events.
const (
	EventSessionStart = "session_start"
	EventQuery        = "query"
	EventRequest      = "request"
	EventDenied       = "denied"
	// EventSessionMigrated: a Postgres session moved to a fresh upstream
	// connection and credential.
	EventSessionMigrated = "session_migrated"
	EventSessionEnd      = "session_end"
)

// Client is who connected.
type Client struct {
	Addr     string `json:"addr"`
	Identity string `json:"identity,omitempty"`
}

// Workload is the pod a DaemonSet credproxy served the session for, and
// how the connection was tied to it (attribution: csi, csi+peercred,
// netns).
type Workload struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"service_account"`
	Pod            string `json:"pod"`
	PodUID         string `json:"pod_uid"`
	Node           string `json:"node"`
	Attribution    string `json:"attribution"`
}

// Lease identifies a leased credential without revealing its id.
type Lease struct {
	IDSHA256 string `json:"id_sha256"`
	TTLSecs  int64  `json:"ttl_s"`
}

// Carried is what a migration moved to the new upstream connection.
type Carried struct {
	Settings int `json:"settings"` // session settings (SET, set_config, SET ROLE)
	Prepared int `json:"prepared"` // prepared statements
	Listen   int `json:"listen"`   // LISTEN channels
}

// Record is one audit line. Fields that belong to other events are omitted;
// those an event always carries (bytes and error on session_end) are pointers
// so that zero values still appear.
type Record struct {
	Time      time.Time `json:"time"`
	Event     string    `json:"event"`
	SessionID string    `json:"session_id"`
	Protocol  string    `json:"protocol"`
	Service   string    `json:"service"`
	Client    Client    `json:"client"`
	// Workload: in DaemonSet mode (workloads), the pod.
	Workload *Workload `json:"workload,omitempty"`

	// session_start
	Upstream   string `json:"upstream,omitempty"`
	Database   string `json:"database,omitempty"`
	DBUser     string `json:"db_user,omitempty"`
	Credential string `json:"credential,omitempty"`
	Lease      *Lease `json:"lease,omitempty"`
	// BackendReused: the upstream connection served an earlier session
	// (postgres[].pool); absent when the service has no pool.
	BackendReused *bool `json:"backend_reused,omitempty"`
	// Replication marks a Postgres replication connection: "physical"
	// (replication=true) or "logical" (replication=database).
	Replication string `json:"replication,omitempty"`

	// query
	//
	// SQL is the statement's text, exactly: UTF-8, converted from the
	// session's client encoding when that is not UTF8, which SQLEncoding
	// then names. When the bytes are not valid in the client encoding (or
	// credproxy cannot convert from it), SQLBase64 holds them as they were
	// sent, and SQL is empty.
	SQL          string `json:"sql,omitempty"`
	SQLEncoding  string `json:"sql_encoding,omitempty"`
	SQLBase64    string `json:"sql_base64,omitempty"`
	SQLTruncated bool   `json:"sql_truncated,omitempty"`

	// request
	Method   string `json:"method,omitempty"`
	Host     string `json:"host,omitempty"`
	Path     string `json:"path,omitempty"`
	Status   int    `json:"status,omitempty"`
	Injected *bool  `json:"injected,omitempty"`

	// denied
	Reason string `json:"reason,omitempty"`

	// session_migrated (and session_start: backend_pid)
	FromLeaseSHA256 string   `json:"from_lease_sha256,omitempty"`
	ToLeaseSHA256   string   `json:"to_lease_sha256,omitempty"`
	Carried         *Carried `json:"carried,omitempty"`
	BackendPID      int64    `json:"backend_pid,omitempty"`

	// session_end (and request)
	BytesIn    *int64  `json:"bytes_in,omitempty"`
	BytesOut   *int64  `json:"bytes_out,omitempty"`
	DurationMS *int64  `json:"duration_ms,omitempty"`
	Error      *string `json:"error,omitempty"`
	SQLState   string  `json:"sqlstate,omitempty"`
}

// Sink receives audit records. Implementations must be safe for concurrent use.
type Sink interface {
	Record(r *Record)
}

// Writer appends records as JSON lines to a file or stdout. Records handed
// over while a write is in flight are gathered into one batch, written
// with one write(2) once that write returns (group commit; see the package
// comment).
type Writer struct {
	w       io.Writer
	closer  io.Closer
	onErr   func(error)
	waiting atomic.Int64

	mu   sync.Mutex
	cond sync.Cond // on mu: a batch was written, or the writer went idle
	// fill is the batch being gathered, fillN its records, fillGen its
	// number; flushed is the number of the last batch handed to write(2).
	fill    []byte
	fillN   int64
	fillGen uint64
	flushed uint64
	// writing: a caller is in write(2) with a batch, outside mu.
	writing bool
	// spare is the buffer of the last batch written, reused for the next.
	spare []byte
}

// Open opens path for appending ("-" is stdout). onErr, if not nil, hears
// about write failures; a failed write does not fail the session.
func Open(path string, onErr func(error)) (*Writer, error) {
	if path == "-" {
		return newWriter(os.Stdout, nil, onErr), nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return newWriter(f, f, onErr), nil
}

// NewWriter writes to w; for tests and embedding.
func NewWriter(w io.Writer) *Writer { return newWriter(w, nil, nil) }

func newWriter(w io.Writer, closer io.Closer, onErr func(error)) *Writer {
	wr := &Writer{w: w, closer: closer, onErr: onErr, fillGen: 1}
	wr.cond.L = &wr.mu
	return wr
}

// Limits on a record as encoded. The statement gets MaxSQLBytes; every
// other text field (an error message, a path) maxFieldBytes.
const (
	MaxSQLBytes   = 1 << 20
	maxFieldBytes = 16 << 10
)

// maxBatchBytes caps a batch: once the batch being gathered holds this
// much, further records wait until a writer takes it. A batch is at most
// this plus one record.
const maxBatchBytes = 256 << 10

// Record writes one line. Time is set to now (UTC) when zero. r is not
// modified; its over-long fields are cut in a copy (SQLTruncated set when
// the statement was). Record returns once the line has been handed to
// write(2), by this call or by another that wrote the batch it was in.
func (w *Writer) Record(r *Record) {
	rec := *r
	if rec.Time.IsZero() {
		rec.Time = time.Now()
	}
	rec.Time = rec.Time.UTC()
	bound(&rec)
	w.waiting.Add(1)
	w.mu.Lock()
	for len(w.fill) >= maxBatchBytes {
		w.advanceLocked()
	}
	n := len(w.fill)
	fill, err := appendRecord(w.fill, &rec)
	if err != nil {
		w.fill = fill[:n]
		w.waiting.Add(-1)
		w.mu.Unlock()
		w.fail(err)
		return
	}
	w.fill = fill
	w.fillN++
	gen := w.fillGen
	for w.flushed < gen {
		w.advanceLocked()
	}
	w.mu.Unlock()
}

// advanceLocked moves the batches on by one step, with w.mu held: it
// writes the batch being gathered when no write is in flight, and
// otherwise waits for the one in flight.
func (w *Writer) advanceLocked() {
	if w.writing {
		w.cond.Wait()
		return
	}
	w.flushLocked()
}

// flushLocked writes the batch being gathered, with w.mu held on entry
// and on return but not during the write, and wakes those waiting on it.
func (w *Writer) flushLocked() {
	buf, gen := w.fill, w.fillGen
	w.waiting.Add(-w.fillN)
	w.fill, w.fillN, w.spare = w.spare[:0], 0, nil
	w.fillGen++
	w.writing = true
	w.mu.Unlock()
	// One write per batch of whole lines: with O_APPEND, lines from
	// concurrent sessions (and other Writers on the file) never
	// interleave.
	_, err := w.w.Write(buf)
	if err != nil {
		w.fail(err)
	}
	w.mu.Lock()
	w.writing = false
	w.flushed = gen
	if cap(buf) <= 4*MaxSQLBytes { // never kept larger: batches are bounded well below
		w.spare = buf[:0]
	}
	w.cond.Broadcast()
}

// Waiting is how many records wait to be handed to write(2) (in the batch
// being gathered, or for room in it) while another batch is written:
// sessions held back by a slow audit sink.
func (w *Writer) Waiting() int { return int(w.waiting.Load()) }

// appendRecord appends r's line, ending in '\n', to b: what json.Encoder
// (without HTML escaping) writes for r with SQL and SQLBase64 empty,
// followed by those two fields when not empty (see FuzzAppendRecord). It
// fails only on a Time that encoding/json cannot encode either.
func appendRecord(b []byte, r *Record) ([]byte, error) {
	if y := r.Time.Year(); y < 0 || y > 9999 {
		_, err := r.Time.MarshalJSON()
		return b, fmt.Errorf("json: error calling MarshalJSON for type time.Time: %w", err)
	}
	b = append(b, `{"time":"`...)
	b = r.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","event":`...)
	b = appendJSONString(b, r.Event)
	b = append(b, `,"session_id":`...)
	b = appendJSONString(b, r.SessionID)
	b = append(b, `,"protocol":`...)
	b = appendJSONString(b, r.Protocol)
	b = append(b, `,"service":`...)
	b = appendJSONString(b, r.Service)
	b = append(b, `,"client":{"addr":`...)
	b = appendJSONString(b, r.Client.Addr)
	b = appendOptString(b, `,"identity":`, r.Client.Identity)
	b = append(b, '}')
	if wl := r.Workload; wl != nil {
		b = append(b, `,"workload":{"namespace":`...)
		b = appendJSONString(b, wl.Namespace)
		b = append(b, `,"service_account":`...)
		b = appendJSONString(b, wl.ServiceAccount)
		b = append(b, `,"pod":`...)
		b = appendJSONString(b, wl.Pod)
		b = append(b, `,"pod_uid":`...)
		b = appendJSONString(b, wl.PodUID)
		b = append(b, `,"node":`...)
		b = appendJSONString(b, wl.Node)
		b = append(b, `,"attribution":`...)
		b = appendJSONString(b, wl.Attribution)
		b = append(b, '}')
	}
	b = appendOptString(b, `,"upstream":`, r.Upstream)
	b = appendOptString(b, `,"database":`, r.Database)
	b = appendOptString(b, `,"db_user":`, r.DBUser)
	b = appendOptString(b, `,"credential":`, r.Credential)
	if l := r.Lease; l != nil {
		b = append(b, `,"lease":{"id_sha256":`...)
		b = appendJSONString(b, l.IDSHA256)
		b = append(b, `,"ttl_s":`...)
		b = strconv.AppendInt(b, l.TTLSecs, 10)
		b = append(b, '}')
	}
	b = appendOptBool(b, `,"backend_reused":`, r.BackendReused)
	b = appendOptString(b, `,"replication":`, r.Replication)
	b = appendOptString(b, `,"sql_encoding":`, r.SQLEncoding)
	if r.SQLTruncated {
		b = append(b, `,"sql_truncated":true`...)
	}
	b = appendOptString(b, `,"method":`, r.Method)
	b = appendOptString(b, `,"host":`, r.Host)
	b = appendOptString(b, `,"path":`, r.Path)
	b = appendOptInt(b, `,"status":`, int64(r.Status))
	b = appendOptBool(b, `,"injected":`, r.Injected)
	b = appendOptString(b, `,"reason":`, r.Reason)
	b = appendOptString(b, `,"from_lease_sha256":`, r.FromLeaseSHA256)
	b = appendOptString(b, `,"to_lease_sha256":`, r.ToLeaseSHA256)
	if c := r.Carried; c != nil {
		b = append(b, `,"carried":{"settings":`...)
		b = strconv.AppendInt(b, int64(c.Settings), 10)
		b = append(b, `,"prepared":`...)
		b = strconv.AppendInt(b, int64(c.Prepared), 10)
		b = append(b, `,"listen":`...)
		b = strconv.AppendInt(b, int64(c.Listen), 10)
		b = append(b, '}')
	}
	b = appendOptInt(b, `,"backend_pid":`, r.BackendPID)
	b = appendOptInt64Ptr(b, `,"bytes_in":`, r.BytesIn)
	b = appendOptInt64Ptr(b, `,"bytes_out":`, r.BytesOut)
	b = appendOptInt64Ptr(b, `,"duration_ms":`, r.DurationMS)
	if r.Error != nil {
		b = append(b, `,"error":`...)
		b = appendJSONString(b, *r.Error)
	}
	b = appendOptString(b, `,"sqlstate":`, r.SQLState)
	// The statement comes last, as it did when encoding/json wrote the
	// rest of the record and the statement was appended to it.
	b = appendOptString(b, `,"sql":`, r.SQL)
	b = appendOptString(b, `,"sql_base64":`, r.SQLBase64)
	return append(b, "}\n"...), nil
}

// appendOptString appends key and s unless s is empty (omitempty).
func appendOptString(b []byte, key, s string) []byte {
	if s == "" {
		return b
	}
	return appendJSONString(append(b, key...), s)
}

func appendOptInt(b []byte, key string, v int64) []byte {
	if v == 0 {
		return b
	}
	return strconv.AppendInt(append(b, key...), v, 10)
}

func appendOptInt64Ptr(b []byte, key string, v *int64) []byte {
	if v == nil {
		return b
	}
	return strconv.AppendInt(append(b, key...), *v, 10)
}

func appendOptBool(b []byte, key string, v *bool) []byte {
	if v == nil {
		return b
	}
	return strconv.AppendBool(append(b, key...), *v)
}

// bound cuts r's text fields so that each encodes within its limit.
func bound(r *Record) {
	var cut bool
	r.SQL, cut = truncateJSON(r.SQL, MaxSQLBytes)
	r.SQLTruncated = r.SQLTruncated || cut
	if jsonLen(r.SQLBase64) > MaxSQLBytes {
		// Whole base64 quanta only, so that what is kept decodes.
		r.SQLBase64 = r.SQLBase64[:(MaxSQLBytes-2)/4*4]
		r.SQLTruncated = true
	}
	for _, f := range []*string{&r.Upstream, &r.Database, &r.DBUser, &r.Credential, &r.SQLEncoding,
		&r.Method, &r.Host, &r.Path, &r.Reason, &r.SQLState, &r.Client.Addr, &r.Client.Identity} {
		*f, _ = truncateJSON(*f, maxFieldBytes)
	}
	if r.Error != nil {
		if e, cut := truncateJSON(*r.Error, maxFieldBytes); cut {
			e += "…"
			r.Error = &e
		}
	}
}

// truncateJSON returns the longest prefix of s, cut between two runes,
// whose JSON encoding (quotes included) takes at most limit bytes, and
// whether it had to cut.
func truncateJSON(s string, limit int) (string, bool) {
	if len(s)+2 <= limit && jsonLen(s) <= limit {
		return s, false
	}
	n := 2
	for i := 0; i < len(s); {
		c, size := runeJSONLen(s[i:])
		if n+c > limit {
			return s[:i], true
		}
		n += c
		i += size
	}
	return s, false
}

// jsonLen is the length of s encoded as a JSON string by encoding/json
// without HTML escaping, quotes included.
func jsonLen(s string) int {
	n := 2
	for i := 0; i < len(s); {
		c, size := runeJSONLen(s[i:])
		n += c
		i += size
	}
	return n
}

// runeJSONLen is how many bytes the first rune of s takes encoded, and
// how many bytes of s it is.
func runeJSONLen(s string) (encoded, size int) {
	b := s[0]
	if b < utf8.RuneSelf {
		switch {
		case b == '"' || b == '\\' || b == '\b' || b == '\f' || b == '\n' || b == '\r' || b == '\t':
			return 2, 1
		case b < 0x20:
			return 6, 1 // \u00XX
		}
		return 1, 1
	}
	r, size := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError && size == 1 {
		return 6, 1 // \ufffd
	}
	if r == '\u2028' || r == '\u2029' {
		return 6, size
	}
	return size, size
}

// appendJSONString appends s as a JSON string, as encoding/json writes it
// without HTML escaping (jsonLen is its length): invalid UTF-8 becomes
// \ufffd.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0 // s[start:i] is still to be copied as it is
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, `\b`...)
			case '\f':
				b = append(b, `\f`...)
			case '\n':
				b = append(b, `\n`...)
			case '\r':
				b = append(b, `\r`...)
			case '\t':
				b = append(b, `\t`...)
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		var esc string
		switch {
		case r == utf8.RuneError && size == 1:
			esc = `\ufffd`
		case r == '\u2028':
			esc = `\u2028`
		case r == '\u2029':
			esc = `\u2029`
		default:
			i += size
			continue
		}
		b = append(b, s[start:i]...)
		b = append(b, esc...)
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

func (w *Writer) fail(err error) {
	if w.onErr != nil {
		w.onErr(err)
	}
}

// Close closes the file (not stdout), after the write in flight, if any.
// It is safe to call more than once.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.writing {
		w.cond.Wait()
	}
	if w.closer == nil {
		return nil
	}
	err := w.closer.Close()
	w.closer = nil
	return err
}

// Discard drops every record; used when audit.path is empty.
type Discard struct{}

// Record implements Sink.
func (Discard) Record(*Record) {}

// Int64 is a helper for the pointer fields.
func Int64(v int64) *int64 { return &v }

// String is a helper for the pointer fields.
func String(v string) *string { return &v }
