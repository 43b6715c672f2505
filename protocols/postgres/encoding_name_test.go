package postgres

import (
	"strings"
	"testing"
)

// oldCanonicalEncoding is canonicalEncoding as it was, building a
// strings.Replacer per call: the reference the table-driven one must
// match for every input.
func oldCanonicalEncoding(name string) string {
	key := strings.NewReplacer("-", "", "_", "").Replace(strings.ToUpper(name))
	switch key {
	case "", "UTF8", "UNICODE":
		return "UTF8"
	case "SQLASCII":
		return "SQL_ASCII"
	case "ISO88591":
		return "LATIN1"
	case "WINDOWS1252":
		return "WIN1252"
	case "SHIFTJIS":
		return "SJIS"
	}
	for pg := range clientEncodings {
		if strings.ReplaceAll(pg, "_", "") == key {
			return pg
		}
	}
	return strings.ToUpper(name)
}

func TestCanonicalEncoding(t *testing.T) {
	tests := map[string]string{
		"UTF8": "UTF8", "utf8": "UTF8", "utf-8": "UTF8", "Unicode": "UTF8", "": "UTF8", "-_": "UTF8",
		"sql_ascii": "SQL_ASCII", "SQL-ASCII": "SQL_ASCII", "iso-8859-1": "LATIN1", "ISO_8859_1": "LATIN1",
		"windows-1252": "WIN1252", "Shift_JIS": "SJIS", "shift-jis": "SJIS", "iso_8859_5": "ISO_8859_5",
		"iso8859-5": "ISO_8859_5", "koi8-r": "KOI8R", "euc-jp": "EUC_JP", "eucjp": "EUC_JP", "gb_18030": "GB18030",
		"mule_internal": "MULE_INTERNAL", "EUC_TW": "EUC_TW", "nonsense": "NONSENSE",
		"ſjis": "SJIS", "ſql_aſcii": "SQL_ASCII", "caf\xe9": "CAF\uFFFD",
		strings.Repeat("u", 40) + "tf8":  strings.Repeat("U", 40) + "TF8",
		strings.Repeat("_", 40) + "utf8": "UTF8",
	}
	for pg := range clientEncodings {
		tests[pg] = pg
		tests[strings.ToLower(pg)] = pg
		tests[strings.ReplaceAll(pg, "_", "")] = pg
		tests[strings.ReplaceAll(strings.ToLower(pg), "_", "-")] = pg
	}
	for in, want := range tests {
		t.Run(in, func(t *testing.T) {
			if got := canonicalEncoding(in); got != want {
				t.Errorf("canonicalEncoding(%q) = %q, want %q", in, got, want)
			}
			if got, old := canonicalEncoding(in), oldCanonicalEncoding(in); got != old {
				t.Errorf("canonicalEncoding(%q) = %q, the old one %q", in, got, old)
			}
		})
	}
}

func TestCanonicalEncodingAllocs(t *testing.T) {
	for _, name := range []string{"UTF8", "utf8", "LATIN1", "win1252", "EUC_JP", "MULE_INTERNAL"} {
		if n := testing.AllocsPerRun(100, func() { canonicalEncoding(name) }); n != 0 {
			t.Errorf("canonicalEncoding(%q): %v allocations, want 0", name, n)
		}
	}
}

func FuzzCanonicalEncoding(f *testing.F) {
	for _, s := range []string{"UTF8", "utf-8", "iso_8859_1", "Shift_JIS", "ſjis", "caf\xe9", "", "-", "latin10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if got, old := canonicalEncoding(name), oldCanonicalEncoding(name); got != old {
			t.Errorf("canonicalEncoding(%q) = %q, the old one %q", name, got, old)
		}
	})
}
