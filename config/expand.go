package config

import (
	"fmt"
	"strings"
)

// expand replaces ${VAR} with the value of VAR, ${VAR:-default} with VAR's
// value or, when VAR is unset or empty, with default, and $$ with a literal $.
// Any other $ is kept as written, so most literal dollars need no escaping.
// It returns one message per problem (unset variable, bad syntax).
func expand(s string, lookup func(string) (string, bool)) (string, []string) {
	if !strings.Contains(s, "$") {
		return s, nil
	}
	var b strings.Builder
	var problems []string
	for i := 0; i < len(s); {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			i++
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i += 2
		case '{':
			end := strings.IndexByte(s[i+2:], '}')
			if end < 0 {
				problems = append(problems, fmt.Sprintf("unterminated ${ in %q (write $$ for a literal $)", s))
				return b.String(), problems
			}
			expr := s[i+2 : i+2+end]
			i += 2 + end + 1
			name, def, hasDef := strings.Cut(expr, ":-")
			if !validEnvName(name) {
				problems = append(problems, fmt.Sprintf("invalid variable reference ${%s} (want ${NAME} or ${NAME:-default})", expr))
				continue
			}
			v, ok := lookup(name)
			switch {
			case ok && (v != "" || !hasDef):
				b.WriteString(v)
			case hasDef:
				b.WriteString(def)
			default:
				problems = append(problems, fmt.Sprintf("environment variable %s is not set", name))
			}
		default:
			b.WriteByte('$')
			i++
		}
	}
	return b.String(), problems
}

// validEnvName reports whether s is a portable environment variable name.
func validEnvName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		switch {
		case c == '_', 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
