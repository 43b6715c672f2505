package config

import (
	"fmt"
	"slices"
	"strings"
	"text/template"
	"text/template/parse"
)

// An inject template (header value, basic username and password, query
// value) is executed over the secret's fields, a map[string]string. It
// should read single fields: .token, $.token, or index . "api-key" for a
// name that is no identifier. Anything that uses the map itself — {{ . }},
// {{ printf "%v" . }}, {{ range . }}, {{ $ }}, {{ len . }}, {{ index . .k }}
// — renders (or can render) every field, the password included, into a
// header or a URL, and is refused: there is no need for it, and the
// upstream, its logs and anything on the way would get the whole secret.

// templateUse is what a template reads from the secret.
type templateUse struct {
	fields []string // fields named at the top level, in order, once each
	whole  []string // actions that use the secret itself, once each
	nested []string // field chains into a field (.token.x), once each
}

// analyzeTemplate walks t and every template it defines. A defined
// template is walked as if called with the secret, whatever it is called
// with: stricter than needed, never looser.
func analyzeTemplate(t *template.Template) templateUse {
	var u templateUse
	ts := t.Templates()
	slices.SortFunc(ts, func(a, b *template.Template) int {
		switch {
		case a.Name() == t.Name():
			return -1
		case b.Name() == t.Name():
			return 1
		}
		return strings.Compare(a.Name(), b.Name())
	})
	for _, tt := range ts {
		if tt.Tree != nil && tt.Tree.Root != nil {
			u.walk(tt.Tree.Root, true)
		}
	}
	return u
}

// walk visits n; rootDot says whether dot is the secret there (it is not
// in the body of a with or range, which rebind it).
func (u *templateUse) walk(n parse.Node, rootDot bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return
		}
		for _, c := range n.Nodes {
			u.walk(c, rootDot)
		}
	case *parse.ActionNode:
		u.pipe(n.Pipe, rootDot, n.String())
	case *parse.TemplateNode:
		u.pipe(n.Pipe, rootDot, n.String())
	case *parse.IfNode:
		u.branch(&n.BranchNode, "if", rootDot, rootDot)
	case *parse.WithNode:
		// The body's dot is the pipeline's value. If that is the secret
		// itself, the pipeline is reported already.
		u.branch(&n.BranchNode, "with", rootDot, false)
	case *parse.RangeNode:
		u.branch(&n.BranchNode, "range", rootDot, false)
	}
}

func (u *templateUse) branch(b *parse.BranchNode, kind string, rootDot, bodyRootDot bool) {
	u.pipe(b.Pipe, rootDot, fmt.Sprintf("{{%s %s}}", kind, b.Pipe))
	u.walk(b.List, bodyRootDot)
	if b.ElseList != nil {
		u.walk(b.ElseList, rootDot)
	}
}

// pipe visits a pipeline; action is its source, for messages.
func (u *templateUse) pipe(p *parse.PipeNode, rootDot bool, action string) {
	if p == nil {
		return
	}
	for _, c := range p.Cmds {
		u.command(c, rootDot, action)
	}
}

func (u *templateUse) command(c *parse.CommandNode, rootDot bool, action string) {
	args := c.Args
	// index . "api-key" reads one field, whose name need not be an identifier.
	if len(args) >= 3 && isIdent(args[0], "index") && isSecret(args[1], rootDot) {
		if s, ok := args[2].(*parse.StringNode); ok {
			u.addField(s.Text)
			args = args[3:]
		}
	}
	for _, a := range args {
		u.arg(a, rootDot, action)
	}
}

func (u *templateUse) arg(n parse.Node, rootDot bool, action string) {
	switch n := n.(type) {
	case *parse.DotNode:
		if rootDot {
			u.whole = appendOnce(u.whole, action)
		}
	case *parse.VariableNode:
		// $ is always the secret; other variables hold what they were
		// given, and giving them the secret is reported there.
		if n.Ident[0] != "$" {
			return
		}
		if len(n.Ident) == 1 {
			u.whole = appendOnce(u.whole, action)
			return
		}
		u.addField(n.Ident[1])
		if len(n.Ident) > 2 {
			u.nested = appendOnce(u.nested, n.String())
		}
	case *parse.FieldNode:
		if !rootDot {
			return
		}
		u.addField(n.Ident[0])
		if len(n.Ident) > 1 {
			u.nested = appendOnce(u.nested, n.String())
		}
	case *parse.ChainNode: // (pipeline).field: the pipeline is judged on its own
		u.arg(n.Node, rootDot, action)
	case *parse.PipeNode:
		u.pipe(n, rootDot, action)
	}
}

func (u *templateUse) addField(name string) { u.fields = appendOnce(u.fields, name) }

func isIdent(n parse.Node, name string) bool {
	id, ok := n.(*parse.IdentifierNode)
	return ok && id.Ident == name
}

// isSecret reports whether n evaluates to the secret itself.
func isSecret(n parse.Node, rootDot bool) bool {
	switch n := n.(type) {
	case *parse.DotNode:
		return rootDot
	case *parse.VariableNode:
		return len(n.Ident) == 1 && n.Ident[0] == "$"
	}
	return false
}

func appendOnce(list []string, s string) []string {
	if slices.Contains(list, s) {
		return list
	}
	return append(list, s)
}

// template parses an inject template as the proxy does and checks what it
// reads: never the whole secret, and, where the secret's fields are known
// before start (fields non-nil), only fields it has.
func (v *validator) template(path, text, secret string, fields map[string]bool) {
	t, err := template.New(path).Option("missingkey=error").Parse(text)
	if err != nil {
		v.add(path, "invalid template: %v", err)
		return
	}
	u := analyzeTemplate(t)
	for _, action := range u.whole {
		v.add(path, "%s uses the whole secret, not one field: it would send every field, the password too; "+
			`name the field, e.g. {{ .token }} or {{ index . "api-key" }}`, action)
	}
	for _, chain := range u.nested {
		v.add(path, "%s: the secret's fields are strings, with no fields of their own", chain)
	}
	if fields == nil {
		return
	}
	for _, f := range u.fields {
		if !fields[f] {
			v.add(path, "secret %q has no field %q (it has %s)", secret, f, strings.Join(sortedKeys(fields), ", "))
		}
	}
}
