package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// decodeLines parses JSON lines; every line must be one complete object.
func decodeLines(t *testing.T, data []byte) []map[string]any {
	t.Helper()
	if len(data) > 0 && data[len(data)-1] != '\n' {
		t.Errorf("output does not end with a newline: %q", data)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %d is not one JSON object: %v: %q", len(out)+1, err, sc.Text())
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("scan: %v", err)
	}
	return out
}

func keys(m map[string]any) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func base(event string) *Record {
	return &Record{
		Time:      time.Date(2024, 5, 1, 12, 0, 0, 123456789, time.FixedZone("CEST", 2*3600)),
		Event:     event,
		SessionID: "s-1",
		Protocol:  "postgres",
		Service:   "appdb",
		Client:    Client{Addr: "127.0.0.1:53211"},
	}
}

func TestWriterFields(t *testing.T) {
	common := []string{"client", "event", "protocol", "service", "session_id", "time"}
	tests := []struct {
		name  string
		rec   func() *Record
		extra []string
		check func(t *testing.T, m map[string]any)
	}{
		{
			name: "session_start",
			rec: func() *Record {
				r := base(EventSessionStart)
				r.Upstream, r.Database, r.DBUser, r.Credential = "db.internal:5432", "app", "v-app-1", "app-dynamic"
				r.Lease = &Lease{IDSHA256: "abc123", TTLSecs: 3600}
				return r
			},
			extra: []string{"credential", "database", "db_user", "lease", "upstream"},
			check: func(t *testing.T, m map[string]any) {
				lease, _ := m["lease"].(map[string]any)
				if lease["id_sha256"] != "abc123" || lease["ttl_s"] != float64(3600) {
					t.Errorf("lease = %v, want id_sha256 abc123 and ttl_s 3600", m["lease"])
				}
				if m["db_user"] != "v-app-1" || m["credential"] != "app-dynamic" {
					t.Errorf("db_user/credential = %v/%v", m["db_user"], m["credential"])
				}
			},
		},
		{
			name: "session_start without lease",
			rec: func() *Record {
				r := base(EventSessionStart)
				r.Upstream, r.Database, r.DBUser, r.Credential = "db:5432", "app", "app", "app-static"
				return r
			},
			extra: []string{"credential", "database", "db_user", "upstream"},
		},
		{
			name: "query",
			rec: func() *Record {
				r := base(EventQuery)
				r.SQL = "SELECT 1"
				return r
			},
			extra: []string{"sql"},
			check: func(t *testing.T, m map[string]any) {
				if m["sql"] != "SELECT 1" {
					t.Errorf("sql = %v", m["sql"])
				}
			},
		},
		{
			name: "query truncated",
			rec: func() *Record {
				r := base(EventQuery)
				r.SQL, r.SQLTruncated = "SELECT", true
				return r
			},
			extra: []string{"sql", "sql_truncated"},
		},
		{
			name: "request",
			rec: func() *Record {
				r := base(EventRequest)
				r.Protocol, r.Service = "http", "api.github.com"
				r.Method, r.Host, r.Path, r.Status = "GET", "api.github.com", "/user", 200
				r.Injected = func() *bool { b := false; return &b }()
				r.BytesIn, r.BytesOut, r.DurationMS = Int64(0), Int64(0), Int64(0)
				return r
			},
			extra: []string{"bytes_in", "bytes_out", "duration_ms", "host", "injected", "method", "path", "status"},
			check: func(t *testing.T, m map[string]any) {
				if m["injected"] != false {
					t.Errorf("injected = %v, want false", m["injected"])
				}
			},
		},
		{
			name: "denied",
			rec: func() *Record {
				r := base(EventDenied)
				r.Reason = "bad startup"
				return r
			},
			extra: []string{"reason"},
		},
		{
			name: "session_end zero values",
			rec: func() *Record {
				r := base(EventSessionEnd)
				r.BytesIn, r.BytesOut, r.DurationMS, r.Error = Int64(0), Int64(0), Int64(0), String("")
				return r
			},
			extra: []string{"bytes_in", "bytes_out", "duration_ms", "error"},
			check: func(t *testing.T, m map[string]any) {
				for _, k := range []string{"bytes_in", "bytes_out", "duration_ms"} {
					if m[k] != float64(0) {
						t.Errorf("%s = %v, want 0", k, m[k])
					}
				}
				if m["error"] != "" {
					t.Errorf("error = %v, want empty string", m["error"])
				}
			},
		},
		{
			name: "session_end with error and sqlstate",
			rec: func() *Record {
				r := base(EventSessionEnd)
				r.BytesIn, r.BytesOut, r.DurationMS, r.Error = Int64(10), Int64(20), Int64(30), String("relay from client: reset")
				r.SQLState = "08006"
				return r
			},
			extra: []string{"bytes_in", "bytes_out", "duration_ms", "error", "sqlstate"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewWriter(&buf)
			w.Record(tc.rec())
			lines := decodeLines(t, buf.Bytes())
			if len(lines) != 1 {
				t.Fatalf("got %d lines, want 1", len(lines))
			}
			m := lines[0]
			want := append(append([]string{}, common...), tc.extra...)
			sort.Strings(want)
			if got := strings.Join(keys(m), ","); got != strings.Join(want, ",") {
				t.Errorf("keys = %s\nwant   %s", got, strings.Join(want, ","))
			}
			if got := m["time"]; got != "2024-05-01T10:00:00.123456789Z" {
				t.Errorf("time = %v, want RFC 3339 in UTC", got)
			}
			if client, _ := m["client"].(map[string]any); client["addr"] != "127.0.0.1:53211" {
				t.Errorf("client = %v, want addr 127.0.0.1:53211", m["client"])
			}
			if tc.check != nil {
				tc.check(t, m)
			}
		})
	}
}

func TestWriterClientIdentity(t *testing.T) {
	var buf bytes.Buffer
	r := base(EventDenied)
	r.Client.Identity = "uid:1000"
	NewWriter(&buf).Record(r)
	m := decodeLines(t, buf.Bytes())[0]
	client, _ := m["client"].(map[string]any)
	if client["identity"] != "uid:1000" {
		t.Errorf("client = %v, want identity uid:1000", m["client"])
	}
}

func TestWriterSetsTime(t *testing.T) {
	var buf bytes.Buffer
	before := time.Now().UTC().Add(-time.Second)
	NewWriter(&buf).Record(&Record{Event: EventDenied})
	after := time.Now().UTC().Add(time.Second)
	s, _ := decodeLines(t, buf.Bytes())[0]["time"].(string)
	got, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("time %q is not RFC 3339: %v", s, err)
	}
	if !strings.HasSuffix(s, "Z") {
		t.Errorf("time %q is not UTC", s)
	}
	if got.Before(before) || got.After(after) {
		t.Errorf("time %v is not now", got)
	}
}

// unsyncWriter is deliberately not safe for concurrent use: the race
// detector and the line check catch a Writer that does not serialise.
type unsyncWriter struct {
	buf    []byte
	writes int
}

func (w *unsyncWriter) Write(p []byte) (int, error) {
	// Copy in small pieces so that unserialised writers interleave.
	for i := 0; i < len(p); i += 64 {
		w.buf = append(w.buf, p[i:min(i+64, len(p))]...)
	}
	w.writes++
	return len(p), nil
}

func TestWriterConcurrent(t *testing.T) {
	const goroutines, perG = 100, 30
	sqlPad := strings.Repeat("x", 300)

	run := func(t *testing.T, w *Writer) {
		t.Helper()
		var wg sync.WaitGroup
		for g := range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range perG {
					r := base(EventQuery)
					r.SessionID = fmt.Sprintf("g%d", g)
					r.SQL = fmt.Sprintf("SELECT %d /* %s */", i, sqlPad)
					w.Record(r)
				}
			}()
		}
		wg.Wait()
	}
	check := func(t *testing.T, data []byte) {
		t.Helper()
		lines := decodeLines(t, data)
		if len(lines) != goroutines*perG {
			t.Fatalf("got %d lines, want %d", len(lines), goroutines*perG)
		}
		seen := make(map[string]bool)
		for _, m := range lines {
			k := fmt.Sprintf("%v/%v", m["session_id"], m["sql"])
			if seen[k] {
				t.Fatalf("duplicate record %s", k[:40])
			}
			seen[k] = true
		}
	}

	t.Run("writer", func(t *testing.T) {
		uw := &unsyncWriter{}
		run(t, NewWriter(uw))
		if uw.writes != goroutines*perG {
			t.Errorf("%d Write calls for %d records, want one per record", uw.writes, goroutines*perG)
		}
		check(t, uw.buf)
	})
	t.Run("file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "audit.jsonl")
		w, err := Open(path, func(err error) { t.Errorf("write error: %v", err) })
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		run(t, w)
		if err := w.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		check(t, data)
	})
	t.Run("two writers on one file", func(t *testing.T) {
		// Two Writers (as after a reload) share the file through O_APPEND.
		path := filepath.Join(t.TempDir(), "audit.jsonl")
		w1, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		w2, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, w := range []*Writer{w1, w2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				run(t, w)
			}()
		}
		wg.Wait()
		w1.Close()
		w2.Close()
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(decodeLines(t, data)); got != 2*goroutines*perG {
			t.Errorf("got %d lines, want %d", got, 2*goroutines*perG)
		}
	})
}

func TestOpenFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")

	w, err := Open(path, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("new audit file mode = %o, want 600", got)
	}
	w.Record(base(EventDenied))
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	// Reopening appends; it never truncates.
	w, err = Open(path, nil)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	w.Record(base(EventSessionEnd))
	w.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := decodeLines(t, data)
	if len(lines) != 2 || lines[0]["event"] != EventDenied || lines[1]["event"] != EventSessionEnd {
		t.Errorf("file has %d lines %v, want denied then session_end", len(lines), lines)
	}
}

func TestOpenAppendsToExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	existing := `{"event":"from_before"}` + "\n"
	if err := os.WriteFile(path, []byte(existing), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := Open(path, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	w.Record(base(EventQuery))
	w.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), existing) {
		t.Errorf("existing content was not kept: %q", data)
	}
	if got := len(decodeLines(t, data)); got != 2 {
		t.Errorf("got %d lines, want 2", got)
	}
}

func TestOpenErrors(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "missing-dir", "audit.jsonl"), nil)
	if err == nil {
		t.Fatalf("Open in a missing directory: no error")
	}
	if !strings.HasPrefix(err.Error(), "open audit log: ") {
		t.Errorf("error %q does not start with the operation", err)
	}
}

func TestWriteFailureReported(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	var mu sync.Mutex
	var errs []error
	w, err := Open(path, func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	w.Record(base(EventDenied)) // must not panic or block
	mu.Lock()
	defer mu.Unlock()
	if len(errs) != 1 || !errors.Is(errs[0], os.ErrClosed) {
		t.Errorf("onErr got %v, want one os.ErrClosed", errs)
	}
}

func TestOpenStdout(t *testing.T) {
	r, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	orig := os.Stdout
	os.Stdout = pw
	t.Cleanup(func() { os.Stdout = orig })

	w, err := Open("-", nil)
	if err != nil {
		t.Fatalf(`Open("-"): %v`, err)
	}
	os.Stdout = orig
	w.Record(base(EventDenied))
	if err := w.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	// Close must not close stdout: the pipe still takes writes.
	if _, err := pw.Write([]byte(`{"event":"after_close"}` + "\n")); err != nil {
		t.Errorf("stdout closed by Writer.Close: %v", err)
	}
	pw.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	lines := decodeLines(t, data)
	if len(lines) != 2 || lines[0]["event"] != EventDenied {
		t.Errorf("stdout got %q, want the denied record", data)
	}
}

func TestDiscard(t *testing.T) {
	var s Sink = Discard{}
	s.Record(base(EventQuery))
}
