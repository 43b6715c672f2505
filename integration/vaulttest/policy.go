package vaulttest

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/ast"
)

// capability is one of Vault's path capabilities, as a bit.
type capability uint32

const (
	capDeny capability = 1 << iota
	capCreate
	capRead
	capUpdate
	capDelete
	capList
	capSudo
	capPatch
	capSubscribe
	capRecover
)

var capabilityNames = map[string]capability{
	"deny": capDeny, "create": capCreate, "read": capRead, "update": capUpdate,
	"delete": capDelete, "list": capList, "sudo": capSudo, "patch": capPatch,
	"subscribe": capSubscribe, "recover": capRecover,
}

// names lists the capabilities in c sorted, or ["deny"] when c denies or
// grants nothing, as sys/capabilities reports them.
func (c capability) names() []string {
	if c&capDeny != 0 {
		return []string{"deny"}
	}
	var out []string
	for name, bit := range capabilityNames {
		if bit != capDeny && c&bit != 0 {
			out = append(out, name)
		}
	}
	if len(out) == 0 {
		return []string{"deny"}
	}
	sort.Strings(out)
	return out
}

// pathRule is one path stanza of a policy.
type pathRule struct {
	// path is the pattern without the trailing "*" of a plain glob; segment
	// wildcard patterns keep theirs, as in Vault's ACL.
	path         string
	glob         bool // trailing "*" (for plain globs, stripped from path)
	segWildcards bool // has "+" segments
	caps         capability
}

// policy is a parsed ACL policy.
type policy struct {
	name  string
	raw   string
	rules []pathRule
}

// validPathKeys are the keys Vault accepts in a path stanza. Only
// capabilities and the legacy policy are enforced here.
var validPathKeys = []string{"comment", "policy", "capabilities", "allowed_parameters", "denied_parameters",
	"required_parameters", "min_wrapping_ttl", "max_wrapping_ttl", "mfa_methods", "control_group",
	"subscribe_event_types"}

// parsePolicy parses HCL or JSON policy text as Vault's ParseACLPolicy does.
func parsePolicy(name, rules string) (*policy, error) {
	p, err := parsePolicyRules(name, rules)
	if err != nil {
		return nil, fmt.Errorf("failed to parse policy: %w", err)
	}
	return p, nil
}

func parsePolicyRules(name, rules string) (*policy, error) {
	root, err := hcl.Parse(rules)
	if err != nil {
		return nil, err
	}
	list, ok := root.Node.(*ast.ObjectList)
	if !ok {
		return nil, errors.New("does not contain a root object")
	}
	if err := checkHCLKeys(list, []string{"name", "path"}); err != nil {
		return nil, err
	}
	p := &policy{name: name, raw: rules}
	for _, item := range list.Filter("path").Items {
		key := "path"
		if len(item.Keys) > 0 {
			key, _ = item.Keys[0].Token.Value().(string)
		}
		body, ok := item.Val.(*ast.ObjectType)
		if !ok {
			return nil, fmt.Errorf("path %q: should be an object", key)
		}
		if err := checkHCLKeys(body.List, validPathKeys); err != nil {
			return nil, fmt.Errorf("path %q: %w", key, err)
		}
		var pc struct {
			Policy       string   `hcl:"policy"`
			Capabilities []string `hcl:"capabilities"`
		}
		if err := hcl.DecodeObject(&pc, item.Val); err != nil {
			return nil, fmt.Errorf("path %q: %w", key, err)
		}
		rule, err := newPathRule(key, pc.Policy, pc.Capabilities)
		if err != nil {
			return nil, err
		}
		p.rules = append(p.rules, rule)
	}
	return p, nil
}

func newPathRule(key, legacy string, capNames []string) (pathRule, error) {
	r := pathRule{path: strings.TrimPrefix(key, "/")}
	if strings.Contains(r.path, "+*") {
		return r, fmt.Errorf("path %q: invalid use of wildcards ('+*' is forbidden)", r.path)
	}
	if r.path == "+" || strings.Contains(r.path, "/+") || strings.HasPrefix(r.path, "+/") {
		r.segWildcards = true
	}
	if strings.HasSuffix(r.path, "*") {
		r.glob = true
		if !r.segWildcards {
			r.path = strings.TrimSuffix(r.path, "*")
		}
	}
	switch legacy {
	case "":
	case "deny":
		capNames = []string{"deny"}
	case "read":
		capNames = append(capNames, "read", "list")
	case "write":
		capNames = append(capNames, "create", "read", "update", "delete", "list")
	case "sudo":
		capNames = append(capNames, "create", "read", "update", "delete", "list", "sudo")
	default:
		return r, fmt.Errorf("path %q: invalid policy %q", key, legacy)
	}
	for _, name := range capNames {
		bit, ok := capabilityNames[name]
		if !ok {
			return r, fmt.Errorf("path %q: invalid capability %q", key, name)
		}
		if bit == capDeny {
			r.caps = capDeny
			break
		}
		r.caps |= bit
	}
	return r, nil
}

// checkHCLKeys is Vault's hclutil.CheckHCLKeys.
func checkHCLKeys(list *ast.ObjectList, valid []string) error {
	var msgs []string
	for _, item := range list.Items {
		if len(item.Keys) == 0 {
			continue
		}
		key, _ := item.Keys[0].Token.Value().(string)
		ok := false
		for _, v := range valid {
			if strings.EqualFold(key, v) {
				ok = true
				break
			}
		}
		if !ok {
			msgs = append(msgs, fmt.Sprintf("invalid key %q on line %d", key, item.Assign.Line))
		}
	}
	if len(msgs) > 0 {
		return errors.New(multiErrorText(msgs...))
	}
	return nil
}

// acl is the merged rule set of a token's policies, as Vault's NewACL
// builds it: rules for the same pattern are combined, and an explicit deny
// overrides everything else granted on that pattern.
type acl struct {
	root  bool
	rules map[string]*pathRule // keyed by pattern text, glob marked
}

func newACL(policies []*policy) *acl {
	a := &acl{rules: map[string]*pathRule{}}
	for _, p := range policies {
		if p.name == "root" {
			a.root = true
			continue
		}
		for _, r := range p.rules {
			key := r.path
			if r.glob && !r.segWildcards {
				key += "*"
			}
			existing, ok := a.rules[key]
			switch {
			case !ok:
				rc := r
				a.rules[key] = &rc
			case existing.caps&capDeny != 0:
			case r.caps&capDeny != 0:
				existing.caps = capDeny
			default:
				existing.caps |= r.caps
			}
		}
	}
	return a
}

// match returns the capabilities of the rule governing path, and whether
// one does. An exact rule wins; otherwise the most specific matching glob
// or segment-wildcard rule, by Vault's priority order.
func (a *acl) match(path string, list bool) (capability, bool) {
	if r, ok := a.rules[path]; ok && !r.glob && !r.segWildcards {
		return r.caps, true
	}
	if list {
		if r, ok := a.rules[strings.TrimSuffix(path, "/")]; ok && !r.glob && !r.segWildcards {
			return r.caps, true
		}
	}
	var best *pathRule
	var bestKey string
	for key, r := range a.rules {
		if !r.glob && !r.segWildcards {
			continue
		}
		if !r.matches(path) {
			continue
		}
		if best == nil || higherPriority(key, bestKey) {
			best, bestKey = r, key
		}
	}
	if best == nil {
		return 0, false
	}
	return best.caps, true
}

func (r *pathRule) matches(path string) bool {
	if !r.segWildcards {
		return strings.HasPrefix(path, r.path)
	}
	pattern := strings.TrimSuffix(r.path, "*")
	pat := strings.Split(pattern, "/")
	segs := strings.Split(path, "/")
	if r.glob {
		if len(segs) < len(pat) {
			return false
		}
	} else if len(segs) != len(pat) {
		return false
	}
	for i, p := range pat {
		last := i == len(pat)-1
		switch {
		case p == "+":
			if last && r.glob {
				// "+*": forbidden at parse time; unreachable.
				return false
			}
		case last && r.glob:
			if !strings.HasPrefix(segs[i], p) {
				return false
			}
		case segs[i] != p:
			return false
		}
	}
	return true
}

// higherPriority reports whether pattern a beats pattern b for a path both
// match, following Vault's documented order: the later first wildcard wins,
// then not ending in "*", then fewer "+" segments, then the longer pattern,
// then the lexicographically larger.
func higherPriority(a, b string) bool {
	fa, fb := firstWildcard(a), firstWildcard(b)
	if fa != fb {
		return fa > fb
	}
	ga, gb := strings.HasSuffix(a, "*"), strings.HasSuffix(b, "*")
	if ga != gb {
		return !ga
	}
	ca, cb := plusSegments(a), plusSegments(b)
	if ca != cb {
		return ca < cb
	}
	if len(a) != len(b) {
		return len(a) > len(b)
	}
	return a > b
}

func firstWildcard(p string) int {
	i := strings.IndexAny(p, "+*")
	if i < 0 {
		return len(p)
	}
	return i
}

func plusSegments(p string) int {
	n := 0
	for _, s := range strings.Split(p, "/") {
		if s == "+" {
			n++
		}
	}
	return n
}

// allows reports whether the ACL permits op on path, with sudo when the
// path is root-protected.
func (a *acl) allows(path string, o op, needSudo bool) bool {
	if a.root {
		return true
	}
	caps, ok := a.match(path, o == opList)
	if !ok || caps&capDeny != 0 {
		return false
	}
	if needSudo && caps&capSudo == 0 {
		return false
	}
	return caps&o.capability() != 0
}

// capabilities lists the capabilities on path, as sys/capabilities-self does.
func (a *acl) capabilities(path string) []string {
	if a.root {
		return []string{"root"}
	}
	caps, _ := a.match(path, true)
	return caps.names()
}

// hasMountAccess is Vault's hasMountAccess: whether any rule grants
// something at or under a mount, which sys/internal/ui/mounts requires.
func (a *acl) hasMountAccess(mountPath string) bool {
	if a.root {
		return true
	}
	if caps, ok := a.match(mountPath, true); ok && caps&capDeny == 0 && caps != 0 {
		return true
	}
	for _, r := range a.rules {
		if r.caps&capDeny != 0 || r.caps == 0 {
			continue
		}
		if strings.HasPrefix(r.path, mountPath) {
			return true
		}
		if r.segWildcards && (&pathRule{path: r.path, glob: true, segWildcards: true}).matches(mountPath) {
			return true
		}
	}
	return false
}

// defaultPolicyText is Vault's built-in "default" policy.
const defaultPolicyText = `
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own entity by id or name
path "identity/entity/id/{{identity.entity.id}}" {
  capabilities = ["read"]
}
path "identity/entity/name/{{identity.entity.name}}" {
  capabilities = ["read"]
}


# Allow a token to look up its resultant ACL from all policies. This is useful
# for UIs. It is an internal path because the format may change at any time
# based on how the internal ACL features and capabilities change.
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body; old path for
# old clients, new path for newer
path "sys/renew" {
    capabilities = ["update"]
}
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties. This requires knowing the lease ID ahead
# of time and does not divulge any sensitive information.
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}

# Allow a token to look up the creation time and TTL of a given
# response-wrapping token
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}

# Allow a token to unwrap a response-wrapping token. This is a convenience to
# avoid client token swapping since this is also part of the response wrapping
# policy.
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}

# Allow a token to make requests to the Authorization Endpoint for OIDC providers.
path "identity/oidc/provider/+/authorize" {
    capabilities = ["read", "update"]
}
`
