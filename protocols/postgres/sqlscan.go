package postgres

import (
	"bytes"
	"strings"
)

// A migration reads a session's state from the backend itself, except for
// two things PostgreSQL does not show: the names of custom settings
// (SET app.tenant = '42' is in no catalog view) and, for a statement made
// with SQL PREPARE, the PREPARE alone (pg_prepared_statements shows the
// whole query string it came in, other statements included). Both are
// found by lexing SQL text: enough of PostgreSQL's lexical rules to tell
// words from strings, quoted identifiers, comments and dollar quotes.

// maxCustomSettings bounds the custom setting names kept per session;
// overflowSetting stands for the rest (the session's state cannot be
// carried whole, so it is not moved).
const (
	maxCustomSettings = 64
	overflowSetting   = "\x00overflow"
)

type tokenKind uint8

const (
	tokWord   tokenKind = iota // keyword or identifier, folded to lower case
	tokQuoted                  // "quoted identifier", unescaped
	tokString                  // 'string' (any form), unescaped where simple
	tokSemi
	tokOther
)

type token struct {
	kind       tokenKind
	text       string
	start, end int // byte offsets in the source
}

// lexSQL splits sql into tokens. It never fails: text it cannot make sense
// of becomes tokOther, and an unterminated quote runs to the end.
func lexSQL(sql string, fn func(token) bool) {
	i := 0
	for i < len(sql) {
		c := sql[i]
		start := i
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
			continue
		case c == '-' && strings.HasPrefix(sql[i:], "--"):
			if j := strings.IndexByte(sql[i:], '\n'); j >= 0 {
				i += j + 1
			} else {
				i = len(sql)
			}
			continue
		case c == '/' && strings.HasPrefix(sql[i:], "/*"):
			depth := 0
			for i < len(sql) {
				switch {
				case strings.HasPrefix(sql[i:], "/*"):
					depth++
					i += 2
				case strings.HasPrefix(sql[i:], "*/"):
					depth--
					i += 2
				default:
					i++
				}
				if depth == 0 {
					break
				}
			}
			continue
		case c == '\'' || ((c == 'e' || c == 'E') && i+1 < len(sql) && sql[i+1] == '\''):
			backslash := c != '\''
			if backslash {
				i++
			}
			var b strings.Builder
			i++
			for i < len(sql) {
				ch := sql[i]
				if backslash && ch == '\\' && i+1 < len(sql) {
					b.WriteByte(sql[i+1])
					i += 2
					continue
				}
				if ch == '\'' {
					if i+1 < len(sql) && sql[i+1] == '\'' {
						b.WriteByte('\'')
						i += 2
						continue
					}
					i++
					break
				}
				b.WriteByte(ch)
				i++
			}
			if !fn(token{tokString, b.String(), start, i}) {
				return
			}
			continue
		case c == '"':
			var b strings.Builder
			i++
			for i < len(sql) {
				if sql[i] == '"' {
					if i+1 < len(sql) && sql[i+1] == '"' {
						b.WriteByte('"')
						i += 2
						continue
					}
					i++
					break
				}
				b.WriteByte(sql[i])
				i++
			}
			if !fn(token{tokQuoted, b.String(), start, i}) {
				return
			}
			continue
		case c == '$':
			// $tag$ ... $tag$ (a parameter $1 is not a quote).
			j := i + 1
			for j < len(sql) && isIdentChar(sql[j]) && !(j == i+1 && isDigit(sql[j])) {
				j++
			}
			if j < len(sql) && sql[j] == '$' {
				tag := sql[i : j+1]
				body := j + 1
				if k := strings.Index(sql[body:], tag); k >= 0 {
					i = body + k + len(tag)
					if !fn(token{tokString, sql[body : body+k], start, i}) {
						return
					}
				} else {
					i = len(sql)
				}
				continue
			}
			i++
		case c == ';':
			i++
			if !fn(token{tokSemi, ";", start, i}) {
				return
			}
			continue
		case isIdentStart(c):
			for i < len(sql) && isIdentChar(sql[i]) {
				i++
			}
			if !fn(token{tokWord, strings.ToLower(sql[start:i]), start, i}) {
				return
			}
			continue
		default:
			i++
		}
		if !fn(token{tokOther, sql[start:i], start, i}) {
			return
		}
	}
}

func isDigit(c byte) bool      { return '0' <= c && c <= '9' }
func isIdentStart(c byte) bool { return c == '_' || c >= 0x80 || 'a' <= c|0x20 && c|0x20 <= 'z' }
func isIdentChar(c byte) bool  { return isIdentStart(c) || isDigit(c) || c == '$' }

// containsFold reports whether s contains the lower-case ASCII word w in
// any letter case; a cheap test before lexing.
func containsFold(s []byte, w string) bool {
	for i := 0; i+len(w) <= len(s); i++ {
		j := 0
		for j < len(w) && s[i+j]|0x20 == w[j] {
			j++
		}
		if j == len(w) {
			return true
		}
	}
	return false
}

// customSettings returns the names of custom settings (a dotted name such
// as app.tenant) that a Query or Parse body may set: SET [SESSION] name,
// and set_config('name', …). Names that turn out not to be settings cost
// nothing: a migration asks the backend for each and carries the ones that
// have a value.
func customSettings(typ byte, body []byte) []string {
	if !containsFold(body, "set") {
		return nil
	}
	if typ == 'P' { // skip the statement name
		i := bytes.IndexByte(body, 0)
		if i < 0 {
			return nil
		}
		body = body[i+1:]
	}
	if i := bytes.IndexByte(body, 0); i >= 0 {
		body = body[:i]
	}
	var out []string
	var prev [3]token // the last tokens, newest first
	lexSQL(string(body), func(t token) bool {
		switch {
		case t.kind == tokWord && (prev[0].kind == tokWord && prev[0].text == "set" ||
			prev[0].kind == tokWord && prev[0].text == "session" && prev[1].kind == tokWord && prev[1].text == "set"):
			// SET [SESSION] name: the name may continue with .part tokens
			// (lexed as words and '.'), collected below.
		case t.kind == tokString && prev[0].kind == tokOther && prev[0].text == "(" &&
			prev[1].kind == tokWord && prev[1].text == "set_config":
			if strings.Contains(t.text, ".") {
				out = append(out, t.text)
			}
		}
		// A dotted name: word . word after SET [SESSION].
		if t.kind == tokWord && prev[0].kind == tokOther && prev[0].text == "." && prev[1].kind == tokWord {
			if isSetKeyword(prev[2]) {
				out = append(out, prev[1].text+"."+t.text)
			}
		}
		prev[2], prev[1], prev[0] = prev[1], prev[0], t
		return len(out) < maxCustomSettings
	})
	return out
}

// isSetKeyword reports whether t is SET or SESSION (after SET): what comes
// before a setting name.
func isSetKeyword(t token) bool {
	return t.kind == tokWord && (t.text == "set" || t.text == "session")
}

// preparedStatementSQL finds, in the query string a statement named name
// was prepared with (pg_prepared_statements.statement for from_sql), the
// PREPARE statement itself; ok is false when there is none.
func preparedStatementSQL(query, name string) (string, bool) {
	start := 0 // where the current statement starts
	words := 0 // tokens seen in it
	var found string
	var isPrepare, match bool
	lexSQL(query, func(t token) bool {
		if t.kind == tokSemi {
			if isPrepare && match {
				found = query[start:t.start]
				return false
			}
			start, words, isPrepare, match = t.end, 0, false, false
			return true
		}
		switch words {
		case 0:
			start = t.start
			isPrepare = t.kind == tokWord && t.text == "prepare"
		case 1:
			match = t.kind == tokWord && t.text == name || t.kind == tokQuoted && t.text == name
		}
		words++
		return true
	})
	if found == "" && isPrepare && match {
		found = query[start:]
	}
	found = strings.TrimSpace(found)
	return found, found != ""
}
