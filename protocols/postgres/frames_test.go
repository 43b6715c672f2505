package postgres

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"testing"

	"github.com/jackc/pgproto3/v2"
)

// appRun is what scanning an app stream saw.
type appRun struct {
	forwarded []byte
	stmts     []string // "Q:text" / "P:text", truncated marked with …
	syncs     int
	after     int // messages after the last sync point
	err       error
	complete  bool // ended at a message boundary with nothing left over
}

// scanApp feeds data to an appScan chunk bytes at a time, as fromClient
// does: what the scan does not consume (a partial header) waits for more.
func scanApp(data []byte, chunk, collect int) appRun {
	var run appRun
	sc := appScan{collect: collect, onStatement: func(typ byte, body []byte, truncated bool) {
		b, ok := statementText(typ, body, truncated)
		sql := string(b)
		if !ok {
			sql = "(malformed)"
		}
		if truncated {
			sql += "…"
		}
		run.stmts = append(run.stmts, string(typ)+":"+sql)
	}}
	var buf []byte
	for off := 0; off < len(data); off += chunk {
		buf = append(buf, data[off:min(off+chunk, len(data))]...)
		n, c, err := sc.scan(buf)
		run.forwarded = append(run.forwarded, buf[:n]...)
		buf = append(buf[:0], buf[n:]...)
		run.syncs += c.syncs
		if c.syncs > 0 {
			run.after = c.after
		} else {
			run.after += c.after
		}
		if err != nil {
			run.err = err
			return run
		}
	}
	run.complete = len(buf) == 0 && sc.atBoundary()
	return run
}

func encodeAll(msgs ...pgproto3.FrontendMessage) []byte {
	var b []byte
	for _, m := range msgs {
		b, _ = m.Encode(b)
	}
	return b
}

func TestAppScan(t *testing.T) {
	big := bytes.Repeat([]byte("Q\x00\x00\x00\x09x"), 10000) // looks like messages, is data
	tests := []struct {
		name      string
		in        []byte
		wantStmts []string
		wantSyncs int
		wantAfter int
		wantErr   error
		complete  bool
	}{
		{"simple queries", encodeAll(&pgproto3.Query{String: "SELECT 1"}, &pgproto3.Query{String: "SELECT 2"}),
			[]string{"Q:SELECT 1", "Q:SELECT 2"}, 2, 0, nil, true},
		{"copy data that looks like messages", encodeAll(&pgproto3.Query{String: "COPY t FROM STDIN"},
			&pgproto3.CopyData{Data: big}, &pgproto3.CopyDone{}, &pgproto3.Query{String: "SELECT 3"}),
			[]string{"Q:COPY t FROM STDIN", "Q:SELECT 3"}, 2, 0, nil, true},
		{"extended protocol", encodeAll(&pgproto3.Parse{Name: "s", Query: "SELECT $1"}, &pgproto3.Bind{PreparedStatement: "s"},
			&pgproto3.Execute{}, &pgproto3.Sync{}), []string{"P:SELECT $1"}, 1, 0, nil, true},
		{"a pipeline without its Sync is in flight", encodeAll(&pgproto3.Parse{Query: "SELECT 1"}, &pgproto3.Bind{},
			&pgproto3.Execute{}, &pgproto3.Flush{}), []string{"P:SELECT 1"}, 0, 3, nil, true},
		{"empty stream", nil, nil, 0, 0, nil, true},
		{"partial header waits", []byte{'Q', 0, 0}, nil, 0, 0, nil, false},
		{"length below 4", []byte{'d', 0, 0, 0, 3}, nil, 0, 0, errBadLength, false},
		{"4 GB message, 10 bytes given", append([]byte{'d', 0xff, 0xff, 0xff, 0xff}, make([]byte, 10)...), nil, 0, 0, nil, false},
	}
	for _, tc := range tests {
		for _, chunk := range []int{1, 7, 4096, len(tc.in) + 1} {
			t.Run(fmt.Sprintf("%s/chunk %d", tc.name, chunk), func(t *testing.T) {
				var run appRun
				noPanic(t, "appScan", func() { run = scanApp(tc.in, chunk, maxAuditSQL) })
				if !errors.Is(run.err, tc.wantErr) {
					t.Fatalf("error = %v, want %v", run.err, tc.wantErr)
				}
				if !bytes.HasPrefix(tc.in, run.forwarded) {
					t.Errorf("forwarded bytes are not a prefix of the input")
				}
				if run.complete != tc.complete {
					t.Errorf("complete = %v, want %v", run.complete, tc.complete)
				}
				if tc.complete && !bytes.Equal(run.forwarded, tc.in) {
					t.Errorf("forwarded %d bytes, want all %d", len(run.forwarded), len(tc.in))
				}
				if fmt.Sprint(run.stmts) != fmt.Sprint(tc.wantStmts) {
					t.Errorf("statements %q, want %q", run.stmts, tc.wantStmts)
				}
				if run.syncs != tc.wantSyncs || run.after != tc.wantAfter {
					t.Errorf("syncs %d after %d, want %d and %d", run.syncs, run.after, tc.wantSyncs, tc.wantAfter)
				}
			})
		}
	}
}

func TestAppScanTruncatesLongStatements(t *testing.T) {
	long := "SELECT '" + string(bytes.Repeat([]byte("x"), 3<<20)) + "'"
	in := encodeAll(&pgproto3.Query{String: long}, &pgproto3.Query{String: "SELECT 2"})
	run := scanApp(in, 64<<10, maxAuditSQL)
	if len(run.stmts) != 2 || len(run.stmts[0]) != 2+maxAuditSQL+len("…") || run.stmts[1] != "Q:SELECT 2" {
		t.Errorf("got %d statements, first %d bytes", len(run.stmts), len(run.stmts[0]))
	}
}

// backendRun is what scanning a backend stream produced.
type backendRun struct {
	out    []byte
	readys int
	tx     byte
	params []string
	fatal  string
	err    error
}

// scanBackend feeds data to a backendScan chunk bytes at a time, as
// toClient does: what the scan needs more of waits.
func scanBackend(data []byte, chunk int, ownPID, appPID uint32) backendRun {
	var run backendRun
	sc := backendScan{ownPID: ownPID, appPID: appPID, onParam: func(n, v string) { run.params = append(run.params, n+"="+v) }}
	var buf []byte
	for off := 0; off < len(data); off += chunk {
		buf = append(buf, data[off:min(off+chunk, len(data))]...)
		n, _, c, err := sc.scan(buf)
		run.out = append(run.out, buf[:n]...)
		buf = append(buf[:0], buf[n:]...)
		run.readys += c.readys
		if c.readys > 0 {
			run.tx = c.tx
		}
		if err != nil {
			run.err = err
			break
		}
	}
	if sc.fatal != nil {
		run.fatal = sc.fatal.Severity + " " + sc.fatal.Code
	}
	return run
}

func encodeBackend(msgs ...pgproto3.BackendMessage) []byte {
	var b []byte
	for _, m := range msgs {
		b, _ = m.Encode(b)
	}
	return b
}

func TestBackendScan(t *testing.T) {
	in := encodeBackend(
		&pgproto3.ParameterStatus{Name: "TimeZone", Value: "UTC"},
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("x")}}},
		&pgproto3.DataRow{Values: [][]byte{[]byte("1")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'T'},
		&pgproto3.NotificationResponse{PID: 4242, Channel: "c", Payload: "own"},
		&pgproto3.NotificationResponse{PID: 777, Channel: "c", Payload: "other"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"},
	)
	want := encodeBackend(
		&pgproto3.ParameterStatus{Name: "TimeZone", Value: "UTC"},
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("x")}}},
		&pgproto3.DataRow{Values: [][]byte{[]byte("1")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'T'},
		&pgproto3.NotificationResponse{PID: 99, Channel: "c", Payload: "own"}, // the app's PID
		&pgproto3.NotificationResponse{PID: 777, Channel: "c", Payload: "other"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"},
	)
	for _, chunk := range []int{1, 3, 9, 64, len(in)} {
		run := scanBackend(in, chunk, 4242, 99)
		if run.err != nil || !bytes.Equal(run.out, want) {
			t.Errorf("chunk %d: err %v, output differs:\n got %x\nwant %x", chunk, run.err, run.out, want)
		}
		if run.readys != 2 || run.tx != 'I' || fmt.Sprint(run.params) != "[TimeZone=UTC]" || run.fatal != "FATAL 57P01" {
			t.Errorf("chunk %d: readys %d tx %q params %v fatal %q", chunk, run.readys, run.tx, run.params, run.fatal)
		}
	}
}

// FuzzAppScan: however the app's bytes are cut into reads, the relay
// forwards a prefix of them (all of them when they end at a message
// boundary), sees the same statements and sync points, and allocates in
// proportion to what it was sent, never to a claimed length.
func FuzzAppScan(f *testing.F) {
	f.Add(encodeAll(&pgproto3.Query{String: "SELECT 1"}, &pgproto3.Terminate{}), uint8(3))
	f.Add(encodeAll(&pgproto3.Parse{Name: "s", Query: "SELECT $1"}, &pgproto3.Bind{PreparedStatement: "s"},
		&pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}), uint8(1))
	f.Add(encodeAll(&pgproto3.Query{String: "COPY t FROM STDIN"}, &pgproto3.CopyData{Data: []byte("1\tfoo\n")},
		&pgproto3.CopyData{Data: []byte("Q\x00\x00\x00\x05x")}, &pgproto3.CopyDone{}), uint8(5))
	f.Add([]byte{'Q', 0xff, 0xff, 0xff, 0xff, 'S', 'E', 'L'}, uint8(2))
	f.Add([]byte{'d', 0xff, 0xff, 0xff, 0xff, 1, 2, 3}, uint8(1))
	f.Add([]byte{'P', 0x00, 0x10, 0x00, 0x05, 's', 0}, uint8(4))
	f.Add([]byte{'X', 0, 0, 0, 3}, uint8(1))
	f.Add([]byte{'Q', 0, 0}, uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		var whole, cut appRun
		noPanic(t, "appScan", func() {
			whole = scanApp(data, len(data)+1, maxAuditSQL)
			cut = scanApp(data, int(chunk)+1, maxAuditSQL)
		})
		runtime.ReadMemStats(&after)
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20+16*uint64(len(data)) {
			t.Fatalf("scanned %d bytes with %d bytes allocated", len(data), alloc)
		}
		for _, run := range []appRun{whole, cut} {
			if !bytes.HasPrefix(data, run.forwarded) {
				t.Fatalf("forwarded bytes are not a prefix of the input")
			}
			if run.complete && !bytes.Equal(run.forwarded, data) {
				t.Fatalf("complete, yet forwarded %d of %d bytes", len(run.forwarded), len(data))
			}
		}
		if (whole.err == nil) != (cut.err == nil) || whole.complete != cut.complete ||
			fmt.Sprint(whole.stmts) != fmt.Sprint(cut.stmts) || whole.syncs != cut.syncs || whole.after != cut.after {
			t.Fatalf("reads of %d bytes saw otherwise than one read:\n whole %+v\n cut   %+v", int(chunk)+1, whole, cut)
		}
	})
}

// FuzzBackendScan: however the backend's bytes are cut, the app gets the
// same bytes (notification PIDs rewritten alike) and the relay sees the
// same ReadyForQuery messages.
func FuzzBackendScan(f *testing.F) {
	f.Add(encodeBackend(&pgproto3.NotificationResponse{PID: 7, Channel: "c"}, &pgproto3.ReadyForQuery{TxStatus: 'I'}), uint8(2))
	f.Add(encodeBackend(&pgproto3.ParameterStatus{Name: "a", Value: "b"}, &pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01"}), uint8(1))
	f.Add([]byte{'A', 0, 0, 0, 4}, uint8(1))
	f.Add([]byte{'Z', 0, 0, 0, 4, 'I'}, uint8(1))
	f.Add([]byte{'E', 0, 0, 0, 3}, uint8(3))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		var whole, cut backendRun
		noPanic(t, "backendScan", func() {
			whole = scanBackend(data, len(data)+1, 7, 99)
			cut = scanBackend(data, int(chunk)+1, 7, 99)
		})
		if len(whole.out) > len(data) {
			t.Fatalf("passed on %d bytes of %d", len(whole.out), len(data))
		}
		if (whole.err == nil) != (cut.err == nil) || whole.readys != cut.readys || whole.tx != cut.tx ||
			fmt.Sprint(whole.params) != fmt.Sprint(cut.params) || whole.fatal != cut.fatal || !bytes.Equal(whole.out, cut.out) {
			t.Fatalf("reads of %d bytes saw otherwise than one read:\n whole %+v\n cut   %+v", int(chunk)+1, whole, cut)
		}
	})
}
