package vaulttest

import (
	"context"
	"regexp"
	"strings"
	"time"
)

// op is a logical operation, as Vault derives it from the HTTP method and,
// for writes, from an existence check.
type op string

const (
	opRead   op = "read"
	opList   op = "list"
	opCreate op = "create"
	opUpdate op = "update"
	opDelete op = "delete"
)

// capability is the capability a policy must grant for o.
func (o op) capability() capability {
	switch o {
	case opRead:
		return capRead
	case opList:
		return capList
	case opCreate:
		return capCreate
	case opUpdate:
		return capUpdate
	case opDelete:
		return capDelete
	}
	return 0
}

// handler serves one operation on a route. It returns Vault's response, or
// an error: an *apiError for answers Vault gives with a status, anything else
// for backend failures (500).
type handler func(r *request) (*response, error)

// route is one path of a backend, like Vault's framework.Path.
type route struct {
	pattern *regexp.Regexp
	ops     map[op]handler
	// exists decides whether a write creates or updates, as a Vault
	// existence check; nil means every write is an update.
	exists func(r *request) bool
	// unauth marks paths reachable without a token (logins).
	unauth bool
	// sudo marks root-protected paths, which need the sudo capability.
	sudo bool
}

// newRoute compiles pattern, anchored, as a route relative to its mount.
func newRoute(pattern string, ops map[op]handler) *route {
	return &route{pattern: regexp.MustCompile("^" + pattern + "$"), ops: ops}
}

// nameRegex is framework.GenericNameRegex.
func nameRegex(name string) string {
	return `(?P<` + name + `>\w(([\w-.@]+)?\w)?)`
}

// backend is a secrets engine or auth method instance.
type backend interface {
	routes() []*route
}

// leaser is a backend whose secrets carry leases.
type leaser interface {
	// renewSecret applies a renewal (e.g. VALID UNTIL) and returns the TTL
	// and max TTL the lease gets before core capping, like a backend's
	// framework.Secret Renew callback.
	renewSecret(ctx context.Context, l *lease, increment time.Duration) (ttl, maxTTL time.Duration, err error)
	// revokeSecret ends the secret, like a framework.Secret Revoke callback.
	revokeSecret(ctx context.Context, l *lease) error
}

// authRenewer is an auth method whose tokens renew against their role,
// like a backend's pathLoginRenew.
type authRenewer interface {
	renewAuth(t *token) (ttl, maxTTL, period time.Duration, err error)
}

// mount is an entry of the mount or auth table.
type mount struct {
	path        string // with trailing slash; auth mounts start with "auth/"
	typ         string
	description string
	accessor    string
	uuid        string
	options     map[string]string
	defaultTTL  time.Duration // 0: the system's
	maxTTL      time.Duration // 0: the system's
	local       bool
	sealWrap    bool
	be          backend
	rts         []*route
}

func newMount(path, typ, description string, options map[string]string, be backend) *mount {
	return &mount{
		path:        path,
		typ:         typ,
		description: description,
		accessor:    strings.ReplaceAll(typ, "-", "_") + "_" + randomHex(8),
		uuid:        newUUID(),
		options:     options,
		be:          be,
		rts:         be.routes(),
	}
}

func (m *mount) isAuth() bool { return strings.HasPrefix(m.path, "auth/") }

// class is the audit log's mount_class.
func (m *mount) class() string {
	if m.isAuth() {
		return "auth"
	}
	return "secret"
}

// info renders the mount as sys/mounts and sys/auth list it (Vault's
// mountInfo).
func (m *mount) info() map[string]any {
	return map[string]any{
		"type":                    m.typ,
		"description":             m.description,
		"accessor":                m.accessor,
		"uuid":                    m.uuid,
		"local":                   m.local,
		"seal_wrap":               m.sealWrap,
		"external_entropy_access": false,
		"options":                 m.options,
		"plugin_version":          "",
		"running_plugin_version":  "v" + "0.0.0+builtin.vaulttest",
		"running_sha256":          "",
		"config": map[string]any{
			"default_lease_ttl": seconds(m.defaultTTL),
			"max_lease_ttl":     seconds(m.maxTTL),
			"force_no_cache":    false,
		},
	}
}

// view is the mount's lease settings, with the system's where it sets none.
func (s *Server) view(m *mount) sysView {
	v := sysView{defaultTTL: s.opts.DefaultLeaseTTL, maxTTL: s.opts.MaxLeaseTTL}
	if m != nil {
		if m.maxTTL > 0 {
			v.maxTTL = m.maxTTL
		}
		if m.defaultTTL > 0 {
			v.defaultTTL = m.defaultTTL
		}
		if v.defaultTTL > v.maxTTL {
			v.defaultTTL = v.maxTTL
		}
	}
	return v
}

// matchMountLocked finds the mount serving path by longest prefix, trying
// path+"/" too so that "secret" means "secret/", as Vault's router does.
// The caller holds s.mu.
func (s *Server) matchMountLocked(path string) *mount {
	find := func(p string) *mount {
		var best *mount
		for mp, m := range s.mounts {
			if strings.HasPrefix(p, mp) && (best == nil || len(mp) > len(best.path)) {
				best = m
			}
		}
		return best
	}
	if m := find(path); m != nil {
		return m
	}
	if !strings.HasSuffix(path, "/") {
		return find(path + "/")
	}
	return nil
}

// resolve finds the mount and route for path. A nil mount means no handler
// for the route; a nil route with a mount means an unsupported path.
func (s *Server) resolve(path string) (*mount, *route, map[string]string) {
	s.mu.Lock()
	m := s.matchMountLocked(path)
	s.mu.Unlock()
	if m == nil {
		return nil, nil, nil
	}
	rel := strings.TrimPrefix(path, m.path)
	if rel == path { // path is the mount without its slash
		rel = ""
	}
	for _, rt := range m.rts {
		match := rt.pattern.FindStringSubmatch(rel)
		if match == nil {
			continue
		}
		vars := map[string]string{}
		for i, name := range rt.pattern.SubexpNames() {
			if name != "" {
				vars[name] = match[i]
			}
		}
		return m, rt, vars
	}
	return m, nil, nil
}
