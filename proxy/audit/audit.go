// Package audit writes credproxy's audit log: one JSON object per line, one
// record per session start, statement, request, refusal and session end.
// Records carry names, addresses, sizes and hashes, never a secret value.
package audit

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
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

	// session_start
	Upstream   string `json:"upstream,omitempty"`
	Database   string `json:"database,omitempty"`
	DBUser     string `json:"db_user,omitempty"`
	Credential string `json:"credential,omitempty"`
	Lease      *Lease `json:"lease,omitempty"`
	// BackendReused: the upstream connection served an earlier session
	// (postgres[].pool); absent when the service has no pool.
	BackendReused *bool `json:"backend_reused,omitempty"`

	// query
	SQL          string `json:"sql,omitempty"`
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

// Writer appends records as JSON lines to a file or stdout.
type Writer struct {
	mu     sync.Mutex
	w      io.Writer
	closer io.Closer
	onErr  func(error)
}

// Open opens path for appending ("-" is stdout). onErr, if not nil, hears
// about write failures; auditing never blocks or fails a session.
func Open(path string, onErr func(error)) (*Writer, error) {
	if path == "-" {
		return &Writer{w: os.Stdout, onErr: onErr}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return &Writer{w: f, closer: f, onErr: onErr}, nil
}

// NewWriter writes to w; for tests and embedding.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Record writes one line. Time is set to now (UTC) when zero.
func (w *Writer) Record(r *Record) {
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	b, err := json.Marshal(r)
	if err != nil {
		w.fail(err)
		return
	}
	b = append(b, '\n')
	w.mu.Lock()
	// One write per record: with O_APPEND, lines from concurrent sessions
	// never interleave.
	_, err = w.w.Write(b)
	w.mu.Unlock()
	if err != nil {
		w.fail(err)
	}
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
