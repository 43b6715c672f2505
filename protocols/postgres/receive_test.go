package postgres

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/jackc/pgproto3/v2"
)

func receiveAll(data []byte) (msgs []pgproto3.BackendMessage, err error) {
	cr := &cappedReader{r: bufio.NewReader(bytes.NewReader(data)), max: maxHandshakeMessage}
	for {
		m, err := receive(cr)
		if err != nil {
			return msgs, err
		}
		msgs = append(msgs, m)
	}
}

func TestReceive(t *testing.T) {
	row := encodeBackend(&pgproto3.DataRow{Values: [][]byte{[]byte("a"), nil, {}}})
	// GO-2026-4518: a DataRow whose field length is negative made
	// pgproto3/v2 panic; it is an error here.
	negative := []byte{'D', 0, 0, 0, 10, 0, 1, 0xff, 0xff, 0xff, 0xfe}
	tooMany := []byte{'D', 0, 0, 0, 6, 0xff, 0xff}
	tests := []struct {
		name    string
		in      []byte
		want    int // messages decoded
		wantErr bool
	}{
		{"a row with a value, a NULL and an empty value", row, 1, false},
		{"handshake messages", encodeBackend(&pgproto3.AuthenticationOk{}, &pgproto3.ParameterStatus{Name: "a", Value: "b"},
			&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: 2}, &pgproto3.ReadyForQuery{TxStatus: 'I'}), 4, false},
		{"negative field length", negative, 0, true},
		{"more columns than bytes", tooMany, 0, true},
		{"negative message length", []byte{'Z', 0xff, 0xff, 0xff, 0xff}, 0, true},
		{"unknown type", []byte{'?', 0, 0, 0, 4}, 0, true},
		{"authentication too short", []byte{'R', 0, 0, 0, 6, 0, 0}, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var msgs []pgproto3.BackendMessage
			var err error
			noPanic(t, "receive", func() { msgs, err = receiveAll(tc.in) })
			if len(msgs) != tc.want {
				t.Errorf("decoded %d messages, want %d", len(msgs), tc.want)
			}
			clean := errors.Is(err, io.EOF) // ended between messages
			if tc.wantErr == clean {
				t.Errorf("error %v, want an error: %v", err, tc.wantErr)
			}
		})
	}
	msgs, _ := receiveAll(row)
	if v := msgs[0].(*pgproto3.DataRow).Values; len(v) != 3 || string(v[0]) != "a" || v[1] != nil || v[2] == nil {
		t.Errorf("row values %q", v)
	}
}

// FuzzReceive: no backend bytes make credproxy's own reader panic.
func FuzzReceive(f *testing.F) {
	f.Add(encodeBackend(&pgproto3.DataRow{Values: [][]byte{[]byte("x")}}))
	f.Add([]byte{'D', 0, 0, 0, 10, 0, 1, 0xff, 0xff, 0xff, 0xfe})
	f.Add(encodeBackend(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}}))
	f.Add(encodeBackend(&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("a")}}}))
	f.Add(encodeBackend(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "m"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		noPanic(t, "receive", func() { _, _ = receiveAll(data) })
	})
}
