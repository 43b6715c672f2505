package postgres

import (
	"bytes"
	"encoding/base64"
	"strings"
	"unicode/utf8"

	"golang.org/x/text/encoding"
	"golang.org/x/text/encoding/charmap"
	"golang.org/x/text/encoding/japanese"
	"golang.org/x/text/encoding/korean"
	"golang.org/x/text/encoding/simplifiedchinese"
	"golang.org/x/text/encoding/traditionalchinese"
)

// The audit records a statement exactly. An app sends it in its session's
// client_encoding (the startup packet's, then each SET, as ParameterStatus
// reports them), which PostgreSQL converts to the server's; the audit log
// is UTF-8 JSON. So credproxy converts too, and checks the conversion is
// exact by converting back: the bytes the app sent are what the recorded
// text encodes to in the recorded encoding. Bytes that are not valid in
// the client encoding, or an encoding credproxy has no table for, are
// recorded as base64 instead: never a replacement character.

// clientEncodings are PostgreSQL's client encodings (their names as
// ParameterStatus reports them) that credproxy converts, with the
// golang.org/x/text table it converts with. UTF8 and SQL_ASCII need none.
var clientEncodings = map[string]encoding.Encoding{
	"LATIN1":     charmap.ISO8859_1,
	"LATIN2":     charmap.ISO8859_2,
	"LATIN3":     charmap.ISO8859_3,
	"LATIN4":     charmap.ISO8859_4,
	"LATIN5":     charmap.ISO8859_9,
	"LATIN6":     charmap.ISO8859_10,
	"LATIN7":     charmap.ISO8859_13,
	"LATIN8":     charmap.ISO8859_14,
	"LATIN9":     charmap.ISO8859_15,
	"LATIN10":    charmap.ISO8859_16,
	"ISO_8859_5": charmap.ISO8859_5,
	"ISO_8859_6": charmap.ISO8859_6,
	"ISO_8859_7": charmap.ISO8859_7,
	"ISO_8859_8": charmap.ISO8859_8,
	"WIN866":     charmap.CodePage866,
	"WIN874":     charmap.Windows874,
	"WIN1250":    charmap.Windows1250,
	"WIN1251":    charmap.Windows1251,
	"WIN1252":    charmap.Windows1252,
	"WIN1253":    charmap.Windows1253,
	"WIN1254":    charmap.Windows1254,
	"WIN1255":    charmap.Windows1255,
	"WIN1256":    charmap.Windows1256,
	"WIN1257":    charmap.Windows1257,
	"WIN1258":    charmap.Windows1258,
	"KOI8R":      charmap.KOI8R,
	"KOI8U":      charmap.KOI8U,
	"EUC_JP":     japanese.EUCJP,
	"SJIS":       japanese.ShiftJIS,
	"EUC_KR":     korean.EUCKR,
	"UHC":        korean.EUCKR, // x/text's EUC-KR is the WHATWG one: Windows-949, which UHC is
	"EUC_CN":     simplifiedchinese.GBK,
	"GBK":        simplifiedchinese.GBK,
	"GB18030":    simplifiedchinese.GB18030,
	"BIG5":       traditionalchinese.Big5,
}

// canonicalEncoding is PostgreSQL's name for a client_encoding as the
// app may have spelled it in its startup packet (ParameterStatus always
// reports the canonical one): case, '-' and '_' ignored, and the common
// aliases. It runs for every audited statement: an ASCII name (every name
// PostgreSQL reports) costs a table look-up and no allocation.
func canonicalEncoding(name string) string {
	if name == "UTF8" {
		return name
	}
	var buf [32]byte
	key, ascii := buf[:0], true
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= utf8.RuneSelf || len(key) == len(buf) {
			ascii = false
			break
		}
		if c == '-' || c == '_' {
			continue
		}
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		key = append(key, c)
	}
	if ascii {
		if pg, ok := canonicalEncodings[string(key)]; ok {
			return pg
		}
		return strings.ToUpper(name) // no allocation when name is upper case already
	}
	// Unicode case mapping (strings.ToUpper maps 'ſ' to 'S', say).
	upper := strings.ToUpper(name)
	k := strings.NewReplacer("-", "", "_", "").Replace(upper)
	if pg, ok := canonicalEncodings[k]; ok {
		return pg
	}
	return upper
}

// canonicalEncodings maps a client_encoding name, upper case without '-'
// and '_', to PostgreSQL's name for it.
var canonicalEncodings = func() map[string]string {
	m := map[string]string{
		"":            "UTF8",
		"UTF8":        "UTF8",
		"UNICODE":     "UTF8",
		"SQLASCII":    "SQL_ASCII",
		"ISO88591":    "LATIN1",
		"WINDOWS1252": "WIN1252",
		"SHIFTJIS":    "SJIS",
	}
	for pg := range clientEncodings {
		if k := strings.ReplaceAll(pg, "_", ""); m[k] == "" {
			m[k] = pg
		}
	}
	return m
}()

// auditText is how the audit records a statement's bytes b, sent in
// clientEncoding: its exact text (UTF-8), or, when that cannot be had,
// the bytes in base64. enc is the client encoding when it is not UTF8.
// truncated says b is the start of a longer statement, which may end in
// the middle of a character: that partial character is dropped.
func auditText(b []byte, clientEncoding string, truncated bool) (text, b64, enc string) {
	name := canonicalEncoding(clientEncoding)
	if name != "UTF8" {
		enc = name
	}
	if t, ok := decodeExact(b, name); ok {
		return t, "", enc
	}
	if truncated && multiByte(name) {
		// The cut may have split a character: the exact text of what
		// comes before it is still the statement's start.
		for cut := 1; cut <= 3 && cut < len(b); cut++ {
			if t, ok := decodeExact(b[:len(b)-cut], name); ok {
				return t, "", enc
			}
		}
	}
	if enc == "" {
		enc = "UTF8" // say why the text is not there
	}
	return "", base64.StdEncoding.EncodeToString(b), enc
}

// decodeExact converts b from the named client encoding to UTF-8, and
// reports whether the conversion is exact.
func decodeExact(b []byte, name string) (string, bool) {
	if isASCII(b) {
		return string(b), true // every client encoding PostgreSQL has is ASCII below 0x80
	}
	switch name {
	case "UTF8", "SQL_ASCII":
		// SQL_ASCII passes bytes through uninterpreted: text only when
		// they are UTF-8, which is then exactly what was sent.
		return string(b), utf8.Valid(b)
	}
	e, ok := clientEncodings[name]
	if !ok {
		return "", false
	}
	text, err := e.NewDecoder().Bytes(b)
	if err != nil {
		return "", false
	}
	back, err := e.NewEncoder().Bytes(text)
	if err != nil || !bytes.Equal(back, b) {
		return "", false // invalid bytes came out as U+FFFD, or a character has two encodings
	}
	return string(text), true
}

// multiByte reports whether a character of the encoding may take more
// than one byte (and so be split where a long statement is cut).
func multiByte(name string) bool {
	switch name {
	case "UTF8", "SQL_ASCII", "EUC_JP", "SJIS", "EUC_KR", "UHC", "EUC_CN", "GBK", "GB18030", "BIG5":
		return true
	}
	return false
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
