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
	"runtime"
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
		if uw.writes < 1 || uw.writes > goroutines*perG {
			t.Errorf("%d Write calls for %d records, want at most one per record", uw.writes, goroutines*perG)
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

// encodeOne is what encoding/json writes for s without HTML escaping.
func encodeOne(t *testing.T, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		t.Fatal(err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// jsonLen agrees with encoding/json on every kind of byte: the cap is on
// what is written, so the count must be exact.
func TestJSONLen(t *testing.T) {
	var all strings.Builder
	for b := 0; b < 0x80; b++ {
		all.WriteByte(byte(b))
	}
	for _, s := range []string{"", "select 1", all.String(), "<>&", "\u2028\u2029", "é€😀", "caf\xe9", "\xff\xfe\x80", "a\x00b\x1fc\x7f"} {
		if got, want := jsonLen(s), len(encodeOne(t, s)); got != want {
			t.Errorf("jsonLen(%q) = %d, encoding/json writes %d", s, got, want)
		}
	}
}

// Issue 13 item 1: a statement of characters JSON escapes (HTML's <, >
// and &; control characters) cannot inflate its audit line. Before,
// json.Marshal wrote 10 MB of '<' as 60 MB of \u003c.
func TestRecordBoundedAsEncoded(t *testing.T) {
	tests := []struct {
		name    string
		sql     string
		cut     bool
		maxLine int
	}{
		{"angle brackets kept as they are", strings.Repeat("<", 1000), false, 1000 + 512},
		{"10 MB of <", strings.Repeat("<", 10<<20), true, MaxSQLBytes + 512},
		{"control characters", strings.Repeat("\x01", 1<<20), true, MaxSQLBytes + 512},
		{"line separators", strings.Repeat("\u2028", 1<<19), true, MaxSQLBytes + 512},
		{"exactly at the limit", strings.Repeat("a", MaxSQLBytes-2), false, MaxSQLBytes + 512},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			w := NewWriter(&out)
			r := base(EventQuery)
			r.SQL = tc.sql
			w.Record(r)
			if r.SQL != tc.sql || r.SQLTruncated {
				t.Errorf("Record modified its argument")
			}
			if out.Len() > tc.maxLine {
				t.Errorf("line of %d bytes, want at most %d", out.Len(), tc.maxLine)
			}
			var got Record
			if err := json.Unmarshal(out.Bytes(), &got); err != nil {
				t.Fatalf("line is not JSON: %v", err)
			}
			if got.SQLTruncated != tc.cut {
				t.Errorf("sql_truncated = %v, want %v", got.SQLTruncated, tc.cut)
			}
			if !strings.HasPrefix(tc.sql, got.SQL) || (!tc.cut && got.SQL != tc.sql) {
				t.Errorf("sql is not the statement's start (%d of %d bytes)", len(got.SQL), len(tc.sql))
			}
			if tc.cut && jsonLen(got.SQL) < MaxSQLBytes-6 {
				t.Errorf("cut to %d encoded bytes, want close to %d", jsonLen(got.SQL), MaxSQLBytes)
			}
			if strings.Contains(tc.sql, "<") && !bytes.Contains(out.Bytes(), []byte("<<<")) {
				t.Errorf("< was escaped")
			}
		})
	}
}

// Every other text field is bounded too, and base64 is cut in whole
// quanta so what is kept still decodes.
func TestRecordOtherFieldsBounded(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out)
	r := base(EventQuery)
	r.SQLBase64 = strings.Repeat("QUJD", MaxSQLBytes)
	r.Error = String(strings.Repeat("\x02", 1<<20))
	r.Path = strings.Repeat("/", 1<<20)
	w.Record(r)
	if out.Len() > MaxSQLBytes+4*maxFieldBytes {
		t.Errorf("line of %d bytes", out.Len())
	}
	var got Record
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.SQLBase64)%4 != 0 || !got.SQLTruncated {
		t.Errorf("sql_base64 of %d bytes, truncated %v", len(got.SQLBase64), got.SQLTruncated)
	}
	if !strings.HasSuffix(deref(got.Error), "…") {
		t.Errorf("a cut error does not say so")
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// blockingWriter holds every Write until release is closed.
type blockingWriter struct {
	release chan struct{}
	mu      sync.Mutex
	n       int
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	b.mu.Lock()
	b.n += bytes.Count(p, []byte("\n")) // lines: a Write may carry a batch
	b.mu.Unlock()
	return len(p), nil
}

// A sink slower than the records holds them back (Waiting counts them),
// drops none, and writes them all once it catches up.
func TestSlowSinkBlocksAndDropsNothing(t *testing.T) {
	bw := &blockingWriter{release: make(chan struct{})}
	w := NewWriter(bw)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := base(EventQuery)
			r.SQL = strings.Repeat("x", 1<<16)
			w.Record(r)
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for w.Waiting() != 7 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := w.Waiting(); n != 7 {
		t.Errorf("Waiting() = %d with one record being written and 7 more handed over, want 7", n)
	}
	close(bw.release)
	wg.Wait()
	if bw.n != 8 || w.Waiting() != 0 {
		t.Errorf("%d records written, %d waiting; want 8 and 0", bw.n, w.Waiting())
	}
}

// Writing a record allocates in proportion to the bounded line, not to
// the statement handed in: a 10 MB statement of '<' once cost ~130 MB of
// allocations (json.Marshal's escaped copy, its buffer's growth, the
// appended newline).
func TestRecordMemoryBounded(t *testing.T) {
	w := NewWriter(io.Discard)
	r := base(EventQuery)
	r.SQL = strings.Repeat("<", 10<<20)
	w.Record(r) // the two buffers (batch written, batch gathered)
	w.Record(r) // reach their size once
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 4 {
		w.Record(r)
	}
	runtime.ReadMemStats(&after)
	if perRecord := (after.TotalAlloc - before.TotalAlloc) / 4; perRecord > 64<<10 {
		t.Errorf("%d bytes allocated per record, want the reused buffers only", perRecord)
	}
}

// appendJSONString must write exactly what encoding/json writes (without
// HTML escaping), and jsonLen must count it.
func FuzzWriteJSONString(f *testing.F) {
	for _, s := range []string{"", "select 1", "<&>", "\"\\\b\f\n\r\t\x00\x1f\x7f", "caf\xe9", "\u2028\u2029é€😀", "\xff\xfe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var want bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(s); err != nil {
			t.Fatal(err)
		}
		got := append(appendJSONString(nil, s), '\n')
		if string(got) != want.String() {
			t.Errorf("appendJSONString(%q) = %s, encoding/json %s", s, got, want.String())
		}
		if n := jsonLen(s); n != want.Len()-1 {
			t.Errorf("jsonLen(%q) = %d, encoded %d", s, n, want.Len()-1)
		}
	})
}
