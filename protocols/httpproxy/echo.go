package httpproxy

import (
	"io"
	"net/http"
	"slices"
	"strings"
)

// An upstream can send an injected credential back: a redirect that
// carries the query string (a stock ServeMux adds the slash and keeps the
// query, api_key and all), a Link or Refresh built from the request URL,
// a cookie path. What comes back goes to the app, which must never see
// the credential, so every response header from a request credproxy
// injected into is scrubbed on its way to the app.

// redacted replaces a credential wherever it is found.
const redacted = "REDACTED"

// maxDecodeRounds bounds how many times a header value is percent-decoded
// looking for a credential encoded more than once.
const maxDecodeRounds = 3

// echoScrubber finds a credential's values in what an upstream sends back
// and replaces them. It is built once per request, from the credential's
// fields and what the injector placed, and used for every header.
type echoScrubber struct {
	// forms are the values in every encoding the scrubber knows (raw,
	// base64 in four alphabets, query- and path-escaped with upper- and
	// lower-case hex), longest first, without duplicates.
	forms []string
}

// newEchoScrubber returns nil when there is nothing to look for (no
// value of minScrubLen or more): the response then costs no work.
func newEchoScrubber(fields map[string]string, placed []string) *echoScrubber {
	base := newScrubber(fields)
	base.add(placed...)
	if len(base.forms) == 0 {
		return nil
	}
	forms := base.forms
	for _, f := range base.forms {
		if l := lowerHex(f); l != f {
			forms = append(forms, l)
		}
	}
	slices.SortFunc(forms, func(a, b string) int { return len(b) - len(a) })
	return &echoScrubber{forms: slices.Compact(forms)}
}

// lowerHex is s with the hex digits of its percent-escapes in lower case.
func lowerHex(s string) string {
	if strings.IndexByte(s, '%') < 0 {
		return s
	}
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' && isHex(b[i+1]) && isHex(b[i+2]) {
			b[i+1], b[i+2] = lowerByte(b[i+1]), lowerByte(b[i+2])
			i += 2
		}
	}
	return string(b)
}

func lowerByte(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// header scrubs h in place and returns the names of the headers it
// changed. A value keeps its shape where it can: in a URL only the
// parameter or segment that carried the credential becomes REDACTED, so
// a redirect still works. A header whose name carries one is dropped.
func (s *echoScrubber) header(h http.Header) []string {
	var changed []string
	for k, vs := range h {
		if _, ok := s.value(k); ok {
			delete(h, k)
			changed = append(changed, k)
			continue
		}
		for i, v := range vs {
			if nv, ok := s.value(v); ok {
				vs[i] = nv
				if len(changed) == 0 || changed[len(changed)-1] != k {
					changed = append(changed, k)
				}
			}
		}
	}
	return changed
}

// value returns v with the credential replaced, and whether it had one.
//
// First every known form is replaced where it appears. Then, if the value
// has percent-escapes or '+', it is decoded (in both readings of '+', up
// to maxDecodeRounds times) to catch an encoding of the upstream's own
// (lower-case hex, encodeURIComponent's, twice-escaped): if a form shows
// up there, the pieces of the value (split at URL and header delimiters)
// that decode to one become REDACTED, a name=value piece keeping its
// name. A value that still decodes to a form is replaced whole.
func (s *echoScrubber) value(v string) (string, bool) {
	out := v
	for _, f := range s.forms {
		if strings.Contains(out, f) {
			out = strings.ReplaceAll(out, f, redacted)
		}
	}
	if s.decodesToForm(out) {
		out = s.pieces(out)
		if s.decodesToForm(out) {
			out = redacted
		}
	}
	return out, out != v
}

// pieceDelims split a header value into the pieces pieces redacts one by
// one: URL delimiters, header parameter delimiters and whitespace.
const pieceDelims = "&;?,/#<>\"' \t"

func (s *echoScrubber) pieces(v string) string {
	var b strings.Builder
	start := 0
	for i := 0; i <= len(v); i++ {
		if i < len(v) && strings.IndexByte(pieceDelims, v[i]) < 0 {
			continue
		}
		p := v[start:i]
		if s.decodesToForm(p) {
			if name, _, ok := strings.Cut(p, "="); ok && !s.decodesToForm(name) {
				p = name + "=" + redacted
			} else {
				p = redacted
			}
		}
		b.WriteString(p)
		if i < len(v) {
			b.WriteByte(v[i])
		}
		start = i + 1
	}
	return b.String()
}

// decodesToForm reports whether percent-decoding v (reading '+' as a
// space or as itself, up to maxDecodeRounds times) shows a form. Values
// without '%' or '+' have nothing to decode and cost nothing.
func (s *echoScrubber) decodesToForm(v string) bool {
	if !strings.ContainsAny(v, "%+") {
		return false
	}
	level := []string{v}
	for range maxDecodeRounds {
		var next []string
		for _, c := range level {
			for _, plus := range []bool{false, true} {
				d := pctDecode(c, plus)
				if d == c || slices.Contains(next, d) {
					continue
				}
				if s.has(d) {
					return true
				}
				if strings.ContainsAny(d, "%+") {
					next = append(next, d)
				}
			}
		}
		if len(next) == 0 {
			return false
		}
		level = next
	}
	return false
}

func (s *echoScrubber) has(v string) bool {
	for _, f := range s.forms {
		if strings.Contains(v, f) {
			return true
		}
	}
	return false
}

// pctDecode decodes every valid %XX in s, and '+' to a space when plus is
// set; anything else is kept as it is.
func pctDecode(s string, plus bool) string {
	if strings.IndexByte(s, '%') < 0 && (!plus || strings.IndexByte(s, '+') < 0) {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		case c == '+' && plus:
			b = append(b, ' ')
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

// trailerScrubber scrubs a response's trailers once its body has been
// read to the end, before goproxy copies them to the app.
type trailerScrubber struct {
	io.ReadCloser
	resp *http.Response
	s    *echoScrubber
	done bool
}

func (t *trailerScrubber) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if err == io.EOF && !t.done {
		t.done = true
		if t.resp.Trailer != nil {
			t.s.header(t.resp.Trailer)
		}
	}
	return n, err
}

// isRedirect reports whether a response is a redirect with a body to drop:
// its body repeats Location (net/http's Redirect writes a link to it).
func isRedirect(code int) bool {
	return code >= 300 && code < 400 && code != http.StatusNotModified
}
