// Package audit writes credproxy's audit log: one JSON object per line, one
// record per session start, statement, request, refusal and session end.
// Records carry names, addresses, sizes and hashes, never a secret value.
//
// A record's size is bounded as written, not as handed in: the statement
// is cut so that its JSON encoding fits MaxSQLBytes, every other text
// field maxFieldBytes, so no input inflates a line (JSON escapes a control
// character as six bytes). The Writer writes one record at a time with
// one reusable buffer; a record waits for the one before it. Sessions
// hand their records over synchronously, so when the audit sink is slower
// than the statements, the statements wait (backpressure to the app), and
// memory stays at one buffer plus the record each waiting session holds:
// never a queue that grows. Nothing is dropped.
package audit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
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

// Writer appends records as JSON lines to a file or stdout. It writes one
// record at a time, from one reusable buffer: a record handed over while
// another is written waits (see the package comment).
type Writer struct {
	mu      sync.Mutex
	w       io.Writer
	closer  io.Closer
	onErr   func(error)
	buf     bytes.Buffer
	enc     *json.Encoder
	waiting atomic.Int64
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
	wr := &Writer{w: w, closer: closer, onErr: onErr}
	wr.enc = json.NewEncoder(&wr.buf)
	// An audit line is read by tools, not browsers: <, > and & stay one
	// byte each rather than six.
	wr.enc.SetEscapeHTML(false)
	return wr
}

// Limits on a record as encoded. The statement gets MaxSQLBytes; every
// other text field (an error message, a path) maxFieldBytes.
const (
	MaxSQLBytes   = 1 << 20
	maxFieldBytes = 16 << 10
)

// Record writes one line. Time is set to now (UTC) when zero. r is not
// modified; its over-long fields are cut in a copy (SQLTruncated set when
// the statement was).
func (w *Writer) Record(r *Record) {
	rec := *r
	if rec.Time.IsZero() {
		rec.Time = time.Now()
	}
	rec.Time = rec.Time.UTC()
	bound(&rec)
	w.waiting.Add(1)
	w.mu.Lock()
	w.waiting.Add(-1)
	defer w.mu.Unlock()
	w.buf.Reset()
	// The statement goes into the buffer directly, not through
	// encoding/json: json.Encoder encodes into a buffer of its own, pooled
	// in a sync.Pool that every GC empties, and copies from there, so a
	// long statement would cost a fresh statement-sized buffer per record
	// whenever a GC came between two. What encoding/json sees is small.
	sql, sql64 := rec.SQL, rec.SQLBase64
	rec.SQL, rec.SQLBase64 = "", ""
	if err := w.enc.Encode(&rec); err != nil { // Encode ends the line with '\n'
		w.fail(err)
		return
	}
	if sql != "" || sql64 != "" {
		w.buf.Truncate(w.buf.Len() - len("}\n"))
		if sql != "" {
			w.buf.WriteString(`,"sql":`)
			writeJSONString(&w.buf, sql)
		}
		if sql64 != "" {
			w.buf.WriteString(`,"sql_base64":`)
			writeJSONString(&w.buf, sql64)
		}
		w.buf.WriteString("}\n")
	}
	// One write per record: with O_APPEND, lines from concurrent sessions
	// never interleave.
	if _, err := w.w.Write(w.buf.Bytes()); err != nil {
		w.fail(err)
	}
	if w.buf.Cap() > 4*MaxSQLBytes {
		w.buf = bytes.Buffer{} // never kept: records are bounded well below
		w.enc = json.NewEncoder(&w.buf)
		w.enc.SetEscapeHTML(false)
	}
}

// Waiting is how many records wait for the one being written: sessions
// held back by a slow audit sink.
func (w *Writer) Waiting() int { return int(w.waiting.Load()) }

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

// writeJSONString writes s as a JSON string, as encoding/json does without
// HTML escaping (jsonLen is its length): invalid UTF-8 becomes \ufffd.
func writeJSONString(b *bytes.Buffer, s string) {
	const hex = "0123456789abcdef"
	b.WriteByte('"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b.WriteByte('\\')
				b.WriteByte(c)
			case c == '\b':
				b.WriteString(`\b`)
			case c == '\f':
				b.WriteString(`\f`)
			case c == '\n':
				b.WriteString(`\n`)
			case c == '\r':
				b.WriteString(`\r`)
			case c == '\t':
				b.WriteString(`\t`)
			case c < 0x20:
				b.WriteString(`\u00`)
				b.WriteByte(hex[c>>4])
				b.WriteByte(hex[c&0xf])
			default:
				b.WriteByte(c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b.WriteString(`\ufffd`)
		case r == '\u2028':
			b.WriteString(`\u2028`)
		case r == '\u2029':
			b.WriteString(`\u2029`)
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	b.WriteByte('"')
}

func (w *Writer) fail(err error) {
	if w.onErr != nil {
		w.onErr(err)
	}
}

// Close closes the file (not stdout). It is safe to call more than once.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
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
