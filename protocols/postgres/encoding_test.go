package postgres

import (
	"encoding/base64"
	"testing"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/proxy/audit"
)

func TestAuditText(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		enc       string
		truncated bool
		text, b64 string // b64 "raw": the input's base64
		wantEnc   string
	}{
		{"UTF8", "select 'café'", "UTF8", false, "select 'café'", "", ""},
		{"unknown is UTF8", "select 1", "", false, "select 1", "", ""},
		{"LATIN1", "select 'caf\xe9'", "LATIN1", false, "select 'café'", "", "LATIN1"},
		{"alias from a startup packet", "select 'caf\xe9'", "iso-8859-1", false, "select 'café'", "", "LATIN1"},
		{"WIN1251", "select '\xcf\xf0\xe8\xe2\xe5\xf2'", "WIN1251", false, "select 'Привет'", "", "WIN1251"},
		{"EUC_JP", "select '\xc6\xfc\xcb\xdc'", "EUC_JP", false, "select '日本'", "", "EUC_JP"},
		{"SJIS", "select '\x93\xfa\x96\x7b'", "SJIS", false, "select '日本'", "", "SJIS"},
		{"ASCII in any encoding", "select 1", "LATIN2", false, "select 1", "", "LATIN2"},
		{"invalid UTF-8 kept as bytes", "select 'caf\xe9'", "UTF8", false, "", "raw", "UTF8"},
		{"invalid EUC_JP kept as bytes", "select '\xc6'", "EUC_JP", false, "", "raw", "EUC_JP"},
		{"undefined WIN1252 byte kept as bytes", "select '\x81'", "WIN1252", true, "", "raw", "WIN1252"},
		{"SQL_ASCII, UTF-8 bytes", "select 'café'", "SQL_ASCII", false, "select 'café'", "", "SQL_ASCII"},
		{"SQL_ASCII, other bytes", "select 'caf\xe9'", "SQL_ASCII", false, "", "raw", "SQL_ASCII"},
		{"no table", "select '\xa1'", "MULE_INTERNAL", false, "", "raw", "MULE_INTERNAL"},
		{"cut inside a character", "select 'caf\xc3", "UTF8", true, "select 'caf", "", ""},
		{"cut inside EUC_JP", "select '\xc6\xfc\xcb", "EUC_JP", true, "select '日", "", "EUC_JP"},
		{"not cut: the same bytes are invalid", "select 'caf\xc3", "UTF8", false, "", "raw", "UTF8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			text, b64, enc := auditText([]byte(tc.in), tc.enc, tc.truncated)
			wantB64 := tc.b64
			if wantB64 == "raw" {
				wantB64 = base64.StdEncoding.EncodeToString([]byte(tc.in))
			}
			if text != tc.text || b64 != wantB64 || enc != tc.wantEnc {
				t.Errorf("auditText(%q, %s) = %q, %q, %q; want %q, %q, %q", tc.in, tc.enc, text, b64, enc, tc.text, wantB64, tc.wantEnc)
			}
		})
	}
}

// Issue 13 item 2: a statement in the session's client encoding is
// recorded exactly, converted from the encoding the backend last reported
// (here set mid-session, as SET client_encoding does), never with U+FFFD.
func TestAuditStatementInClientEncoding(t *testing.T) {
	up := startUpstream(t, func(u *upConn) {
		if !u.ready(true) {
			return
		}
		u.serve(func(m pgproto3.FrontendMessage) {
			if q, ok := m.(*pgproto3.Query); ok && q.String == "SET client_encoding TO 'LATIN1'" {
				u.send(&pgproto3.ParameterStatus{Name: "client_encoding", Value: "LATIN1"})
			}
		})
	})
	p := startProxy(t, testService(up.addr), withAuditQueries)
	c := dialProxy(t, p.addr)
	c.connect(map[string]string{"user": "appuser"})
	// Each waits for its ReadyForQuery, as the client's next statement
	// follows the ParameterStatus that the SET produced.
	for _, q := range []string{"select 'caf\xc3\xa9'", "SET client_encoding TO 'LATIN1'", "select 'caf\xe9'"} {
		c.send(&pgproto3.Query{String: q})
		c.readUntilReady()
	}
	terminate(t, p, c)
	got := p.audit.find(audit.EventQuery)
	if len(got) != 3 {
		t.Fatalf("%d query records", len(got))
	}
	if got[0].SQL != "select 'café'" || got[0].SQLEncoding != "" {
		t.Errorf("UTF8: sql %q, encoding %q", got[0].SQL, got[0].SQLEncoding)
	}
	if got[2].SQL != "select 'café'" || got[2].SQLEncoding != "LATIN1" || got[2].SQLBase64 != "" {
		t.Errorf("LATIN1: sql %q, encoding %q, base64 %q", got[2].SQL, got[2].SQLEncoding, got[2].SQLBase64)
	}
}
