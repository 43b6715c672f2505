package config

import (
	"fmt"
	"reflect"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// maxNodes bounds the work done on one document, so that aliases repeated
// many times (a "billion laughs" file) fail instead of exhausting memory.
const maxNodes = 100_000

// decoder walks a yaml.Node tree into a Go value itself instead of using
// yaml.v3's decoding, so that every problem — unknown key, wrong type, unset
// ${VAR} — is reported with its key path and none stops the walk.
type decoder struct {
	lookup  func(string) (string, bool)
	errs    Errors
	present map[string]bool // key paths given a non-null value, for defaults
	bad     map[string]bool // key paths that failed to decode, so validation skips them
	budget  int
}

func newDecoder(lookup func(string) (string, bool)) *decoder {
	return &decoder{
		lookup:  lookup,
		present: map[string]bool{},
		bad:     map[string]bool{},
		budget:  maxNodes,
	}
}

func (d *decoder) fail(path, format string, args ...any) {
	d.errs = append(d.errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	d.bad[path] = true
}

// spend charges one node against the budget and reports whether work may go on.
func (d *decoder) spend() bool {
	d.budget--
	if d.budget == 0 {
		d.fail("", "config is too large or repeats aliases too often")
	}
	return d.budget > 0
}

func keyPath(parent, key string) string {
	if parent == "" {
		return key
	}
	return parent + "." + key
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return "a scalar"
	}
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// decode stores n into v, which must be addressable. Null leaves v unchanged.
func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) {
	if !d.spend() {
		return
	}
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if isNull(n) {
		return
	}
	d.present[path] = true

	if v.Addr().Type().Implements(unmarshalerType) {
		if n.Kind != yaml.ScalarNode {
			d.fail(path, "must be a scalar, not %s", kindName(n))
			return
		}
		s, ok := d.expandScalar(n, path)
		if !ok {
			return
		}
		if err := v.Addr().Interface().(yaml.Unmarshaler).UnmarshalYAML(s); err != nil {
			d.fail(path, "%v", err)
		}
		return
	}

	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		d.decode(n, v.Elem(), path)
	case reflect.Struct:
		d.decodeStruct(n, v, path)
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			d.fail(path, "must be a list, not %s", kindName(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			d.decode(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			d.fail(path, "must be a mapping, not %s", kindName(n))
			return
		}
		if v.IsNil() {
			v.Set(reflect.MakeMap(v.Type()))
		}
		for _, p := range d.pairs(n, path, nil) {
			elem := reflect.New(v.Type().Elem()).Elem()
			d.decode(p.val, elem, keyPath(path, p.key))
			v.SetMapIndex(reflect.ValueOf(p.key).Convert(v.Type().Key()), elem)
		}
	case reflect.String, reflect.Int, reflect.Bool:
		d.decodeScalar(n, v, path)
	default:
		// Only reachable if config.go gains a field type this walker does not know.
		panic(fmt.Sprintf("config: unsupported field type %s at %s", v.Type(), path))
	}
}

func (d *decoder) decodeStruct(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.MappingNode {
		if path == "" {
			d.fail(path, "config must be a mapping of keys, not %s", kindName(n))
		} else {
			d.fail(path, "must be a mapping, not %s", kindName(n))
		}
		return
	}
	fields := map[string]int{}
	t := v.Type()
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if name != "" && name != "-" && t.Field(i).IsExported() {
			fields[name] = i
		}
	}
	for _, p := range d.pairs(n, path, nil) {
		i, ok := fields[p.key]
		if !ok {
			msg := "unknown key"
			if s := suggest(p.key, fields); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			}
			d.fail(keyPath(path, p.key), "%s", msg)
			continue
		}
		d.decode(p.val, v.Field(i), keyPath(path, p.key))
	}
}

// decodeScalar stores a string, int or bool after ${VAR} expansion.
func (d *decoder) decodeScalar(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.ScalarNode {
		d.fail(path, "must be a %s, not %s", map[reflect.Kind]string{
			reflect.String: "string", reflect.Int: "number", reflect.Bool: "boolean",
		}[v.Kind()], kindName(n))
		return
	}
	s, ok := d.expandScalar(n, path)
	if !ok {
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(s.Value)
	case reflect.Int:
		var x int
		if s.Decode(&x) != nil {
			d.fail(path, "must be an integer, not %q", s.Value)
			return
		}
		v.SetInt(int64(x))
	case reflect.Bool:
		var x bool
		if s.Decode(&x) != nil {
			d.fail(path, "must be true or false, not %q", s.Value)
			return
		}
		v.SetBool(x)
	}
}

// expandScalar returns a copy of n with ${VAR} expanded. The copy's tag is
// cleared so that a number or boolean produced by expansion (or quoted) is
// resolved from its text, not taken as the string the parser saw.
func (d *decoder) expandScalar(n *yaml.Node, path string) (*yaml.Node, bool) {
	s, problems := expand(n.Value, d.lookup)
	for _, p := range problems {
		d.fail(path, "%s", p)
	}
	if len(problems) > 0 {
		return nil, false
	}
	c := *n
	c.Value, c.Tag, c.Style = s, "", 0
	return &c, true
}

type pair struct {
	key string
	val *yaml.Node
}

// pairs returns the key/value pairs of mapping n, with YAML merge keys ("<<")
// applied: keys written in n win over merged ones. It reports duplicate and
// non-string keys. visiting guards against a merge that includes itself.
func (d *decoder) pairs(n *yaml.Node, path string, visiting map[*yaml.Node]bool) []pair {
	if visiting[n] {
		d.fail(path, "merge key includes its own mapping")
		return nil
	}
	if visiting == nil {
		visiting = map[*yaml.Node]bool{}
	}
	visiting[n] = true
	defer delete(visiting, n)

	var own, merged []pair
	line := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if !d.spend() {
			return nil
		}
		k, val := n.Content[i], n.Content[i+1]
		for k.Kind == yaml.AliasNode && k.Alias != nil {
			k = k.Alias
		}
		if k.Kind != yaml.ScalarNode {
			d.fail(path, "keys must be strings, not %s (line %d)", kindName(k), k.Line)
			continue
		}
		if k.ShortTag() == "!!merge" {
			merged = append(merged, d.mergeSources(val, path, visiting)...)
			continue
		}
		if first, dup := line[k.Value]; dup {
			d.fail(keyPath(path, k.Value), "duplicate key (first set on line %d)", first)
			continue
		}
		line[k.Value] = k.Line
		own = append(own, pair{k.Value, val})
	}
	for _, p := range merged {
		if _, ok := line[p.key]; !ok {
			line[p.key] = 0
			own = append(own, p)
		}
	}
	return own
}

// mergeSources returns the pairs a "<<" value brings in: one mapping, or a
// list of mappings where earlier ones win.
func (d *decoder) mergeSources(val *yaml.Node, path string, visiting map[*yaml.Node]bool) []pair {
	for val.Kind == yaml.AliasNode && val.Alias != nil {
		val = val.Alias
	}
	switch val.Kind {
	case yaml.MappingNode:
		return d.pairs(val, path, visiting)
	case yaml.SequenceNode:
		var out []pair
		for _, item := range val.Content {
			for item.Kind == yaml.AliasNode && item.Alias != nil {
				item = item.Alias
			}
			if item.Kind != yaml.MappingNode {
				d.fail(keyPath(path, "<<"), "merge list items must be mappings, not %s", kindName(item))
				continue
			}
			out = append(out, d.pairs(item, path, visiting)...)
		}
		return out
	default:
		d.fail(keyPath(path, "<<"), "merge value must be a mapping or a list of mappings, not %s", kindName(val))
		return nil
	}
}

// suggest returns the known key closest to an unknown one, if it is close
// enough to be a likely typo.
func suggest(key string, known map[string]int) string {
	names := make([]string, 0, len(known))
	for k := range known {
		names = append(names, k)
	}
	sort.Strings(names)
	best, bestDist := "", 3
	for _, k := range names {
		if dist := editDistance(strings.ToLower(key), k); dist < bestDist {
			best, bestDist = k, dist
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return len(a) + len(b) // not a typo of a config key; skip the quadratic work
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
