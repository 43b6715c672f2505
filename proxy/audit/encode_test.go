package audit

import (
	"bytes"
	"encoding/json"
	"io"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// jsonRecord is the line encoding/json writes for r, as the Writer wrote
// it before appendRecord: json.Encoder without HTML escaping for r with
// the statement fields empty, then those fields appended.
func jsonRecord(t testing.TB, r *Record) []byte {
	t.Helper()
	rec := *r
	sql, sql64 := rec.SQL, rec.SQLBase64
	rec.SQL, rec.SQLBase64 = "", ""
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&rec); err != nil {
		t.Fatalf("encoding/json: %v", err)
	}
	buf.Truncate(buf.Len() - len("}\n"))
	for _, f := range []struct{ key, v string }{{"sql", sql}, {"sql_base64", sql64}} {
		if f.v == "" {
			continue
		}
		buf.WriteString(`,"` + f.key + `":`)
		if err := enc.Encode(f.v); err != nil {
			t.Fatal(err)
		}
		buf.Truncate(buf.Len() - 1)
	}
	buf.WriteString("}\n")
	return buf.Bytes()
}

func checkAppendRecord(t *testing.T, r *Record) {
	t.Helper()
	want := jsonRecord(t, r)
	got, err := appendRecord(nil, r)
	if err != nil {
		t.Fatalf("appendRecord: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("appendRecord:\n got %s\nwant %s", got, want)
	}
}

// setAll sets every field of v, recursively through structs and
// pointers, to a non-zero value of its kind.
func setAll(t *testing.T, v reflect.Value, s string, n int64) {
	t.Helper()
	switch v.Kind() {
	case reflect.String:
		v.SetString(s)
	case reflect.Int, reflect.Int64, reflect.Int32:
		v.SetInt(n)
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		setAll(t, v.Elem(), s, n)
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			v.Set(reflect.ValueOf(time.Date(2026, 12, 1, 1, 2, 3, 450000000, time.UTC)))
			return
		}
		for i := range v.NumField() {
			setAll(t, v.Field(i), s+v.Type().Field(i).Name, n+int64(i))
		}
	default:
		t.Fatalf("field of kind %s: teach appendRecord (and this test) about it", v.Kind())
	}
}

// A field added to Record, or to a struct it holds, that appendRecord
// does not write fails here: every field set, the outputs differ.
func TestAppendRecordEveryField(t *testing.T) {
	var r Record
	setAll(t, reflect.ValueOf(&r).Elem(), "v", 1)
	checkAppendRecord(t, &r)
	// Pointers to zero values are written; zero values behind no pointer
	// are not.
	z := Record{Time: time.Unix(0, 0).UTC(), Workload: &Workload{}, Lease: &Lease{}, BackendReused: new(bool),
		Injected: new(bool), Carried: &Carried{}, BytesIn: new(int64), BytesOut: new(int64),
		DurationMS: new(int64), Error: new(string)}
	checkAppendRecord(t, &z)
	checkAppendRecord(t, &Record{})
}

func TestAppendRecordBadTime(t *testing.T) {
	r := &Record{Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}
	if _, err := appendRecord(nil, r); err == nil {
		t.Error("appendRecord with year 10000: no error, encoding/json fails")
	}
	r.Time = time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)
	if _, err := appendRecord(nil, r); err == nil {
		t.Error("appendRecord with year -1: no error, encoding/json fails")
	}
}

// appendRecord writes byte for byte what encoding/json wrote, for records
// built from arbitrary input, through the Writer's bounds.
func FuzzAppendRecord(f *testing.F) {
	f.Add("select 1", "caf\xe9\u2028\u2029<&>\"\\\x00\x1f\x7f", int64(0), int64(1_700_000_000_123_456_789), uint16(0xffff), false)
	f.Add("", "", int64(-1), int64(0), uint16(0), true)
	f.Add(strings.Repeat("\x01", 1000), "\xff\xfe😀", int64(1<<62), int64(9_000_000_000_123_456_000), uint16(0x5555), false)
	f.Fuzz(func(t *testing.T, a, b string, n, nanos int64, mask uint16, big bool) {
		if big {
			a = strings.Repeat(a+"\x00", MaxSQLBytes/(len(a)+1)+1)
		}
		str := func(i int) string {
			if mask&(1<<(i%16)) == 0 {
				return ""
			}
			if i%2 == 0 {
				return a
			}
			return b
		}
		ptr := func(i int) bool { return mask&(1<<(i%16)) != 0 }
		r := Record{
			Time: time.Unix(0, nanos).UTC(), Event: str(0), SessionID: str(1), Protocol: str(2), Service: str(3),
			Client:   Client{Addr: str(4), Identity: str(5)},
			Upstream: str(6), Database: str(7), DBUser: str(8), Credential: str(9), Replication: str(10),
			SQL: str(11), SQLEncoding: str(12), SQLBase64: str(13), SQLTruncated: ptr(14),
			Method: str(15), Host: str(0), Path: str(1), Status: int(n), Reason: str(2),
			FromLeaseSHA256: str(3), ToLeaseSHA256: str(4), BackendPID: n, SQLState: str(5),
		}
		if ptr(6) {
			r.Workload = &Workload{str(7), str(8), str(9), str(10), str(11), str(12)}
		}
		if ptr(7) {
			r.Lease = &Lease{IDSHA256: str(13), TTLSecs: n}
		}
		if ptr(8) {
			v := ptr(9)
			r.BackendReused, r.Injected = &v, &v
		}
		if ptr(10) {
			r.Carried = &Carried{int(n), int(n >> 8), int(n >> 16)}
		}
		if ptr(11) {
			r.BytesIn, r.BytesOut, r.DurationMS = &n, &nanos, &n
		}
		if ptr(12) {
			r.Error = &b
		}
		bound(&r)
		checkAppendRecord(t, &r)
	})
}

func benchRecord() *Record {
	return &Record{Event: EventQuery, SessionID: "0af1c3d2e5b64f78", Protocol: "postgres", Service: "orders",
		Client: Client{Addr: "127.0.0.1:53412"}, SQL: "SELECT abalance FROM pgbench_accounts WHERE aid = $1"}
}

func BenchmarkWriterRecord(b *testing.B) {
	w := NewWriter(io.Discard)
	r := benchRecord()
	b.ReportAllocs()
	for b.Loop() {
		w.Record(r)
	}
}

func BenchmarkWriterRecordParallel(b *testing.B) {
	// A real file: what group commit saves is write(2) calls.
	w, err := Open(filepath.Join(b.TempDir(), "audit.jsonl"), func(err error) { b.Error(err) })
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { w.Close() })
	r := benchRecord()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			w.Record(r)
		}
	})
}

// gatedWriter holds the first Write until release is closed and records
// the size of every Write.
type gatedWriter struct {
	release chan struct{}
	mu      sync.Mutex
	writes  []int
	lines   int
}

func (g *gatedWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	first := len(g.writes) == 0
	g.writes = append(g.writes, len(p))
	g.lines += bytes.Count(p, []byte("\n"))
	g.mu.Unlock()
	if first {
		<-g.release
	}
	return len(p), nil
}

// Records handed over during a write go out together in the next one, and
// none of their Record calls returns before that write.
func TestGroupCommit(t *testing.T) {
	gw := &gatedWriter{release: make(chan struct{})}
	w := NewWriter(gw)
	var returned atomic.Int64
	var wg sync.WaitGroup
	rec := func() {
		defer wg.Done()
		w.Record(base(EventQuery))
		returned.Add(1)
	}
	wg.Add(1)
	go rec()
	waitFor(t, func() bool { gw.mu.Lock(); defer gw.mu.Unlock(); return len(gw.writes) == 1 })
	for range 7 {
		wg.Add(1)
		go rec()
	}
	waitFor(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.fillN == 7 })
	if n := returned.Load(); n != 0 {
		t.Errorf("%d Record calls returned before their write", n)
	}
	if n := w.Waiting(); n != 7 {
		t.Errorf("Waiting() = %d, want 7", n)
	}
	close(gw.release)
	wg.Wait()
	if len(gw.writes) != 2 || gw.lines != 8 || w.Waiting() != 0 {
		t.Errorf("writes %v with %d lines, %d waiting; want 2 writes, 8 lines, 0 waiting", gw.writes, gw.lines, w.Waiting())
	}
}

// A batch stops growing at maxBatchBytes: records beyond wait for the
// next one.
func TestGroupCommitBatchCapped(t *testing.T) {
	gw := &gatedWriter{release: make(chan struct{})}
	w := NewWriter(gw)
	r := base(EventQuery)
	r.SQL = strings.Repeat("x", 64<<10)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.Record(r)
		}()
	}
	waitFor(t, func() bool { return w.Waiting() >= 19 })
	close(gw.release)
	wg.Wait()
	line := len(jsonRecord(t, &Record{}))
	for _, n := range gw.writes {
		if n > maxBatchBytes+len(r.SQL)+line+1024 {
			t.Errorf("a write of %d bytes, want at most a batch (%d) and one record", n, maxBatchBytes)
		}
	}
	if gw.lines != 20 {
		t.Errorf("%d lines, want 20", gw.lines)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 20s")
		}
		time.Sleep(time.Millisecond)
	}
}
