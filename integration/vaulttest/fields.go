package vaulttest

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// fields is a request's data, decoded from JSON with UseNumber. Its getters
// convert values the way Vault's framework.FieldData does for the field
// types named in their comments, and report conversion failures as Vault
// does: 400 "error converting input <v> for field "<name>": <reason>".
type fields map[string]any

func convErr(name string, v any, err error) error {
	return badRequest("error converting input %v for field %q: %s", v, name, err)
}

func (d fields) has(name string) bool {
	_, ok := d[name]
	return ok
}

// str is TypeString: strings, numbers and booleans are accepted.
func (d fields) str(name string) (string, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return "", nil
	}
	switch x := v.(type) {
	case string:
		return x, nil
	case json.Number:
		return x.String(), nil
	case bool:
		return strconv.FormatBool(x), nil
	}
	return "", convErr(name, v, fmt.Errorf("expected a string, got %T", v))
}

// boolean is TypeBool, with def when absent.
func (d fields) boolean(name string, def bool) (bool, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return def, nil
	}
	switch x := v.(type) {
	case bool:
		return x, nil
	case string:
		if x == "" {
			return false, nil
		}
		b, err := strconv.ParseBool(x)
		if err != nil {
			return false, convErr(name, v, err)
		}
		return b, nil
	case json.Number:
		n, err := x.Int64()
		if err != nil {
			return false, convErr(name, v, err)
		}
		return n != 0, nil
	}
	return false, convErr(name, v, fmt.Errorf("expected a bool, got %T", v))
}

// integer is TypeInt.
func (d fields) integer(name string) (int, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return 0, nil
	}
	var s string
	switch x := v.(type) {
	case json.Number:
		s = x.String()
	case string:
		s = x
	case float64:
		s = strconv.FormatFloat(x, 'f', -1, 64)
	case int:
		return x, nil
	default:
		return 0, convErr(name, v, fmt.Errorf("expected an integer, got %T", v))
	}
	if s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || f != math.Trunc(f) {
			return 0, convErr(name, v, err)
		}
		n = int(f)
	}
	return n, nil
}

// duration is TypeDurationSecond: a number of seconds, or a string that is
// a number of seconds, a Go duration ("1h30m") or a number of days ("2d"),
// as parseutil.ParseDurationSecond accepts.
func (d fields) duration(name string) (time.Duration, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return 0, nil
	}
	dur, err := parseDurationSecond(v)
	if err != nil {
		return 0, convErr(name, v, err)
	}
	return dur, nil
}

func parseDurationSecond(v any) (time.Duration, error) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		if err != nil {
			return 0, err
		}
		return time.Duration(f * float64(time.Second)), nil
	case float64:
		return time.Duration(x * float64(time.Second)), nil
	case int:
		return time.Duration(x) * time.Second, nil
	case string:
		s := strings.TrimSpace(x)
		if s == "" {
			return 0, nil
		}
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return time.Duration(n) * time.Second, nil
		}
		if days, ok := strings.CutSuffix(s, "d"); ok {
			n, err := strconv.ParseInt(days, 10, 64)
			if err != nil {
				return 0, err
			}
			return time.Duration(n) * 24 * time.Hour, nil
		}
		return time.ParseDuration(s)
	}
	return 0, fmt.Errorf("could not parse %T as a duration", v)
}

// strings is TypeStringSlice: a list, or a single string taken as one
// element (mapstructure's weak decoding), each element trimmed.
func (d fields) strings(name string) ([]string, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return nil, nil
	}
	switch x := v.(type) {
	case string:
		if x == "" {
			return []string{}, nil
		}
		return []string{strings.TrimSpace(x)}, nil
	case []any:
		out := make([]string, 0, len(x))
		for _, e := range x {
			s, err := (fields{name: e}).str(name)
			if err != nil {
				return nil, err
			}
			out = append(out, strings.TrimSpace(s))
		}
		return out, nil
	}
	return nil, convErr(name, v, fmt.Errorf("expected a list of strings, got %T", v))
}

// commaStrings is TypeCommaStringSlice: a list, or a comma-separated string;
// elements are trimmed and empty ones dropped.
func (d fields) commaStrings(name string) ([]string, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return nil, nil
	}
	var parts []string
	switch x := v.(type) {
	case string:
		parts = strings.Split(x, ",")
	default:
		l, err := d.strings(name)
		if err != nil {
			return nil, err
		}
		parts = l
	}
	out := []string{}
	for _, p := range parts {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out, nil
}

// stringMap is TypeKVPairs / a map of strings.
func (d fields) stringMap(name string) (map[string]string, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return nil, nil
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, convErr(name, v, fmt.Errorf("expected a map, got %T", v))
	}
	out := make(map[string]string, len(m))
	for k, e := range m {
		s, err := (fields{k: e}).str(k)
		if err != nil {
			return nil, convErr(name, v, err)
		}
		out[k] = s
	}
	return out, nil
}

// object is TypeMap.
func (d fields) object(name string) (map[string]any, error) {
	v, ok := d[name]
	if !ok || v == nil {
		return nil, nil
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, convErr(name, v, fmt.Errorf("expected a map, got %T", v))
	}
	return m, nil
}

// parseArbitraryStringSlice is strutil.ParseArbitraryStringSlice: the input
// may be a JSON array, a base64-encoded JSON array, or a sep-delimited list.
func parseArbitraryStringSlice(input, sep string) []string {
	input = strings.TrimSpace(input)
	if dec, err := base64.StdEncoding.DecodeString(input); err == nil && len(dec) > 0 {
		input = string(dec)
	}
	var list []string
	if err := json.Unmarshal([]byte(input), &list); err == nil {
		return list
	}
	return strings.Split(input, sep)
}

// sanitizePolicies is policyutil.SanitizePolicies: trims, lowercases,
// de-duplicates and sorts, and adds "default" when asked unless the list
// holds "root".
func sanitizePolicies(policies []string, addDefault bool) []string {
	seen := map[string]bool{}
	out := []string{}
	for _, p := range policies {
		p = strings.ToLower(strings.TrimSpace(p))
		if p == "" || seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
	}
	if seen["root"] {
		return []string{"root"}
	}
	if addDefault && !seen["default"] {
		out = append(out, "default")
	}
	sort.Strings(out)
	return out
}

// seconds renders a duration as Vault renders TypeDurationSecond fields.
func seconds(d time.Duration) int64 { return int64(d / time.Second) }
