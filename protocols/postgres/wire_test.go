package postgres

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/jackc/pgproto3/v2"
)

// noPanic runs f and turns a panic into a test failure, so that one crash
// does not end the whole test binary.
func noPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("%s panicked: %v\n%s", what, r, debug.Stack())
		}
	}()
	f()
}

func TestReadStartupPacket(t *testing.T) {
	tests := []struct {
		name       string
		data       []byte
		wantErr    error // errors.Is; nil means success
		wantCode   uint32
		wantParams map[string]string
	}{
		{"startup 3.0", encodeStartup(protocol30, map[string]string{"user": "u", "database": "d"}), nil, protocol30, map[string]string{"user": "u", "database": "d"}},
		{"startup 3.2 with option", encodeStartup(3<<16|2, map[string]string{"user": "u", "_pq_.x": "1"}), nil, 3<<16 | 2, map[string]string{"user": "u", "_pq_.x": "1"}},
		{"SSLRequest", requestPacket(sslRequestCode), nil, sslRequestCode, nil},
		{"GSSENCRequest", requestPacket(gssEncRequestCode), nil, gssEncRequestCode, nil},
		{"CancelRequest", cancelPacket(1, 2), nil, cancelRequestCode, nil},
		{"protocol 2.0 is read, refused later", encodeStartup(2<<16, map[string]string{"user": "u"}), nil, 2 << 16, nil},
		{"empty", nil, io.EOF, 0, nil},
		{"short header", []byte{0, 0, 0, 8, 0}, io.ErrUnexpectedEOF, 0, nil},
		{"short body", encodeStartup(protocol30, map[string]string{"user": "u"})[:10], io.ErrUnexpectedEOF, 0, nil},
		{"length 7", []byte{0, 0, 0, 7, 0, 3, 0, 0}, errBadStartup, 0, nil},
		// The length alone is enough to refuse: nothing more is read.
		{"length 4 and nothing after it", []byte{0, 0, 0, 4}, errBadStartup, 0, nil},
		{"length 0 and nothing after it", []byte{0, 0, 0, 0}, errBadStartup, 0, nil},
		{"length 10001 and nothing after it", []byte{0, 0, 0x27, 0x11}, errBadStartup, 0, nil},
		{"length then closed", []byte{0, 0, 0, 8}, io.ErrUnexpectedEOF, 0, nil},
		{"length 10001", []byte{0, 0, 0x27, 0x11, 0, 3, 0, 0}, errBadStartup, 0, nil},
		{"length 4 GB", []byte{0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0}, errBadStartup, 0, nil},
		{"SSLRequest with body", []byte{0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0}, errBadStartup, 0, nil},
		{"startup without parameters", []byte{0, 0, 0, 9, 0, 3, 0, 0, 0}, errBadStartup, 0, nil},
		{"startup missing final NUL", []byte{0, 0, 0, 14, 0, 3, 0, 0, 'u', 0, 'v', 0, 'x', 0}, errBadStartup, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var p *startupPacket
			var err error
			noPanic(t, "readStartupPacket", func() { p, err = readStartupPacket(bytes.NewReader(tc.data)) })
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("error = %v", err)
			}
			if p.code != tc.wantCode {
				t.Errorf("code = %d, want %d", p.code, tc.wantCode)
			}
			if tc.wantParams != nil && !equalParams(p.params, tc.wantParams) {
				t.Errorf("params = %q, want %q", p.params, tc.wantParams)
			}
		})
	}
}

func TestDecodeCancel(t *testing.T) {
	p, err := readStartupPacket(bytes.NewReader(cancelPacket(0x01020304, 0xa0b0c0d0)))
	if err != nil {
		t.Fatal(err)
	}
	cr, err := decodeCancel(p)
	if err != nil {
		t.Fatal(err)
	}
	if cr.ProcessID != 0x01020304 || cr.SecretKey != 0xa0b0c0d0 {
		t.Errorf("decoded %#x/%#x", cr.ProcessID, cr.SecretKey)
	}
	for _, body := range [][]byte{nil, {1, 2, 3}, make([]byte, 12)} {
		if _, err := decodeCancel(&startupPacket{code: cancelRequestCode, body: body}); !errors.Is(err, errBadStartup) {
			t.Errorf("decodeCancel of a %d-byte body: error %v, want errBadStartup", len(body), err)
		}
	}
}

func TestAppendNegotiateProtocolVersion(t *testing.T) {
	tests := []struct {
		name    string
		options []string
		want    []byte
	}{
		// The version is 3.0 as a full protocol number (196608), byte for
		// byte what PostgreSQL 15 sends.
		{"no options", nil, []byte{'v', 0, 0, 0, 12, 0, 3, 0, 0, 0, 0, 0, 0}},
		{"one option", []string{"_pq_.a"}, append([]byte{'v', 0, 0, 0, 19, 0, 3, 0, 0, 0, 0, 0, 1}, "_pq_.a\x00"...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("before")
			got := appendNegotiateProtocolVersion(append([]byte(nil), prefix...), protocol30, tc.options)
			if !bytes.HasPrefix(got, prefix) {
				t.Fatalf("prefix overwritten: %q", got)
			}
			if got = got[len(prefix):]; !bytes.Equal(got, tc.want) {
				t.Errorf("got %x, want %x", got, tc.want)
			}
		})
	}
}

func TestStatementText(t *testing.T) {
	parse := func(name, query string) []byte {
		b, _ := (&pgproto3.Parse{Name: name, Query: query, ParameterOIDs: []uint32{23}}).Encode(nil)
		return b[5:]
	}
	tests := []struct {
		name      string
		typ       byte
		body      []byte
		truncated bool
		want      string
		wantOK    bool
	}{
		{"Query", 'Q', []byte("SELECT 1\x00"), false, "SELECT 1", true},
		{"Query empty string", 'Q', []byte{0}, false, "", true},
		{"Query without NUL", 'Q', []byte("SELECT 1"), false, "", false},
		{"Query with inner NUL", 'Q', []byte("SELECT 1\x00x\x00"), false, "", false},
		// pgproto3/v2's Query.Decode panics on an empty body (src[:-1]).
		{"empty Query body", 'Q', []byte{}, false, "", false},
		{"Parse", 'P', parse("s1", "SELECT $1"), false, "SELECT $1", true},
		{"Parse unnamed", 'P', parse("", "SELECT 2"), false, "SELECT 2", true},
		{"Parse truncated body", 'P', []byte("s1\x00SELE"), false, "", false},
		{"Parse empty body", 'P', []byte{}, false, "", false},
		{"Parse missing OID count", 'P', []byte("s\x00q\x00"), false, "", false},
		{"truncated Query", 'Q', []byte("SELECT very long"), true, "SELECT very long", true},
		{"truncated Parse", 'P', []byte("s1\x00SELECT very"), true, "SELECT very", true},
		{"truncated Parse without name end", 'P', []byte("s1"), true, "", false},
		{"truncated empty", 'Q', []byte{}, true, "", true},
		{"other type", 'B', []byte{0, 0}, false, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b []byte
			var ok bool
			noPanic(t, "statementText", func() { b, ok = statementText(tc.typ, tc.body, tc.truncated) })
			if got := string(b); got != tc.want || ok != tc.wantOK {
				t.Errorf("statementText = %q, %v; want %q, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestCappedReader(t *testing.T) {
	cr := &cappedReader{r: bufio.NewReader(strings.NewReader("abcdefgh")), max: 4}
	b, err := cr.Next(4)
	if err != nil || string(b) != "abcd" {
		t.Errorf("Next(4) = %q, %v", b, err)
	}
	if _, err := cr.Next(5); !errors.Is(err, errTooLarge) {
		t.Errorf("Next(5) error = %v, want errTooLarge", err)
	}
	if _, err := cr.Next(4); err != nil {
		t.Errorf("Next after a refused size: %v", err)
	}
	if _, err := cr.Next(1); !errors.Is(err, io.EOF) {
		t.Errorf("Next at EOF: %v", err)
	}
}

func TestClientError(t *testing.T) {
	errs := []error{
		newUpstreamError(failAuth, "28P01", "upstream rejected the injected credential", nil),
		&startupError{code: "08P01", msg: "invalid startup packet", err: errBadStartup},
		fmt.Errorf("wrapped: %w", newUpstreamError(failUnreachable, "08001", "upstream x unreachable", io.EOF)),
		errors.New("something else"),
	}
	for _, err := range errs {
		resp, kind := clientError(err)
		if resp.Severity != "FATAL" || resp.Code == "" || kind.reason() == "" {
			t.Errorf("clientError(%v) = %+v, %q", err, resp, kind.reason())
		}
		if !strings.HasPrefix(resp.Message, "credproxy: ") {
			t.Errorf("message %q does not start with credproxy:", resp.Message)
		}
	}
}
