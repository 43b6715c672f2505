package vaulttest

import (
	"encoding/base64"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// sysBackend is the system backend mounted at sys/.
func (s *Server) sysBackend() backend { return &sysBackend{s: s} }

type sysBackend struct{ s *Server }

func (b *sysBackend) routes() []*route {
	sudo := func(rt *route) *route { rt.sudo = true; return rt }
	unauth := func(rt *route) *route { rt.unauth = true; return rt }
	return []*route{
		newRoute(`mounts`, map[op]handler{opRead: b.listMounts}),
		newRoute(`mounts/(?P<path>.+?)/tune`, map[op]handler{opRead: b.readTune, opUpdate: b.tune}),
		newRoute(`mounts/(?P<path>.+)`, map[op]handler{opRead: b.readMount, opUpdate: b.mount, opDelete: b.unmount}),
		newRoute(`auth`, map[op]handler{opRead: b.listAuth}),
		sudo(newRoute(`auth/(?P<path>.+)`, map[op]handler{opRead: b.readAuth, opUpdate: b.enableAuth, opDelete: b.disableAuth})),

		newRoute(`policies/acl/?`, map[op]handler{opList: b.listPolicies}),
		newRoute(`policies/acl/(?P<name>.+)`, map[op]handler{opRead: b.readPolicy("policy"), opUpdate: b.writePolicy("policy"), opDelete: b.deletePolicy}),
		newRoute(`policy/?`, map[op]handler{opRead: b.listPoliciesLegacy, opList: b.listPolicies}),
		newRoute(`policy/(?P<name>.+)`, map[op]handler{opRead: b.readPolicy("rules"), opUpdate: b.writePolicy("rules"), opDelete: b.deletePolicy}),
		newRoute(`capabilities-self`, map[op]handler{opUpdate: b.capabilitiesSelf}),

		unauth(newRoute(`internal/ui/mounts`, map[op]handler{opRead: b.uiMounts})),
		unauth(newRoute(`internal/ui/mounts/(?P<path>.+)`, map[op]handler{opRead: b.uiMount})),

		sudo(newRoute(`audit`, map[op]handler{opRead: b.listAudit})),
		sudo(newRoute(`audit/(?P<path>.+)`, map[op]handler{opUpdate: b.enableAudit, opDelete: b.disableAudit})),
		newRoute(`audit-hash/(?P<path>.+)`, map[op]handler{opUpdate: b.auditHash}),

		newRoute(`leases/lookup`, map[op]handler{opUpdate: b.leaseLookup}),
		sudo(newRoute(`leases/lookup(/(?P<prefix>.*))?`, map[op]handler{opList: b.leaseList})),
		newRoute(`(leases/)?renew(/(?P<url_lease_id>.+))?`, map[op]handler{opUpdate: b.leaseRenew}),
		newRoute(`(leases/)?revoke(/(?P<url_lease_id>.+))?`, map[op]handler{opUpdate: b.leaseRevoke}),
		sudo(newRoute(`(leases/)?revoke-prefix/(?P<prefix>.+)`, map[op]handler{opUpdate: b.revokePrefix(false)})),
		sudo(newRoute(`(leases/)?revoke-force/(?P<prefix>.+)`, map[op]handler{opUpdate: b.revokePrefix(true)})),
	}
}

// handleHealth is sys/health, outside the logical envelope: 200 for an
// initialized, unsealed, active node, or the code asked for in activecode.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		respondError(w, http.StatusMethodNotAllowed, "")
		return
	}
	code := http.StatusOK
	q := r.URL.Query()
	for _, name := range []string{"uninitcode", "sealedcode", "standbycode", "activecode", "drsecondarycode", "performancestandbycode"} {
		v, ok := q[name]
		if !ok {
			continue
		}
		c, err := strconv.Atoi(v[0])
		if err != nil {
			respondError(w, http.StatusBadRequest, "")
			return
		}
		if name == "activecode" {
			code = c
		}
	}
	body := map[string]any{
		"initialized":                  true,
		"sealed":                       false,
		"standby":                      false,
		"performance_standby":          false,
		"replication_performance_mode": "disabled",
		"replication_dr_mode":          "disabled",
		"server_time_utc":              time.Now().UTC().Unix(),
		"version":                      s.opts.Version,
		"cluster_name":                 s.clusterName,
		"cluster_id":                   s.clusterID,
	}
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		return
	}
	writeJSON(w, code, body)
}

// handleSealStatus is sys/seal-status: always initialized and unsealed.
func (s *Server) handleSealStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		respondError(w, http.StatusMethodNotAllowed, "")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"type":          "shamir",
		"initialized":   true,
		"sealed":        false,
		"t":             1,
		"n":             1,
		"progress":      0,
		"nonce":         "",
		"version":       s.opts.Version,
		"build_date":    "",
		"migration":     false,
		"cluster_name":  s.clusterName,
		"cluster_id":    s.clusterID,
		"recovery_seal": false,
		"storage_type":  "inmem",
	})
}

// sanitizeMountPath adds a trailing slash and drops a leading one.
func sanitizeMountPath(p string) string {
	p = strings.TrimPrefix(p, "/")
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return p
}

var protectedMounts = []string{"audit/", "auth/", "sys/", "cubbyhole/", "identity/"}

// mountConfig parses a mount's config block (default_lease_ttl,
// max_lease_ttl, as strings or seconds; "system" means unset).
func mountConfig(d fields) (def, maxTTL time.Duration, err error) {
	cfg, err := d.object("config")
	if err != nil || cfg == nil {
		return 0, 0, err
	}
	parse := func(name, what string) (time.Duration, error) {
		v, ok := cfg[name]
		if !ok || v == nil || v == "" || v == "system" {
			return 0, nil
		}
		dur, err := parseDurationSecond(v)
		if err != nil {
			return 0, badRequest("unable to parse %s TTL of %v: %s", what, v, err)
		}
		return dur, nil
	}
	if def, err = parse("default_lease_ttl", "default"); err != nil {
		return 0, 0, err
	}
	if maxTTL, err = parse("max_lease_ttl", "max"); err != nil {
		return 0, 0, err
	}
	if maxTTL != 0 && def > maxTTL {
		return 0, 0, badRequest("given default lease TTL greater than given max lease TTL")
	}
	return def, maxTTL, nil
}

func (b *sysBackend) listMounts(r *request) (*response, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	data := map[string]any{}
	for p, m := range s.mounts {
		if !m.isAuth() {
			data[p] = m.info()
		}
	}
	return &response{data: data}, nil
}

func (b *sysBackend) readMount(r *request) (*response, error) {
	p := sanitizeMountPath(r.vars["path"])
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.mounts[p]
	if m == nil || m.isAuth() != strings.HasPrefix(p, "auth/") {
		return nil, badRequest("No secret engine mount at %s", p)
	}
	return &response{data: m.info()}, nil
}

// mount enables a secrets engine (Vault's handleMount).
func (b *sysBackend) mount(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	typ, err := r.data.str("type")
	if err != nil {
		return nil, err
	}
	if typ == "" {
		return nil, badRequest("backend type must be specified as a string")
	}
	options, err := r.data.stringMap("options")
	if err != nil {
		return nil, err
	}
	desc, _ := r.data.str("description")
	def, maxTTL, err := mountConfig(r.data)
	if err != nil {
		return nil, err
	}
	local, _ := r.data.boolean("local", false)
	sealWrap, _ := r.data.boolean("seal_wrap", false)

	switch typ {
	case "kv-v1", "kv-v2", "generic":
		if options == nil {
			options = map[string]string{}
		}
		if typ == "kv-v2" {
			options["version"] = "2"
		} else if typ == "kv-v1" {
			options["version"] = "1"
		}
		typ = "kv"
	}
	var be backend
	switch typ {
	case "kv":
		switch options["version"] {
		case "", "1":
			be = newKVv1()
		case "2":
			be = newKVv2()
		default:
			return nil, badRequest("invalid version for kv: %q", options["version"])
		}
	case "database":
		be = newDatabase(s)
	default:
		return nil, badRequest("plugin not found in the catalog: %s", typ)
	}
	for _, pm := range protectedMounts {
		if strings.HasPrefix(p, pm) {
			return nil, coded(http.StatusForbidden, "cannot mount %q", p)
		}
	}
	m := newMount(p, typ, desc, options, be)
	m.defaultTTL, m.maxTTL = def, maxTTL
	m.local, m.sealWrap = local, sealWrap

	s.mu.Lock()
	defer s.mu.Unlock()
	if existing := s.conflictLocked(p); existing != "" {
		return nil, badRequest("path is already in use at %s", existing)
	}
	s.mounts[p] = m
	return nil, nil
}

// conflictLocked returns the mount path that p collides with, if any.
func (s *Server) conflictLocked(p string) string {
	for mp := range s.mounts {
		if strings.HasPrefix(p, mp) || strings.HasPrefix(mp, p) {
			return mp
		}
	}
	return ""
}

// unmount disables a secrets engine, revoking its leases first as Vault's
// unmountInternal does.
func (b *sysBackend) unmount(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	s.mu.Lock()
	m := s.mounts[p]
	s.mu.Unlock()
	if m == nil || m.isAuth() || m.typ == "system" {
		return nil, nil
	}
	if err := s.revokePrefix(r.ctx, p, true, false); err != nil {
		return nil, badRequest("%s", err)
	}
	s.mu.Lock()
	delete(s.mounts, p)
	s.mu.Unlock()
	if c, ok := m.be.(interface{ close() }); ok {
		c.close()
	}
	return nil, nil
}

func (b *sysBackend) readTune(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.mounts[p]
	if m == nil {
		return nil, badRequest("cannot fetch sysview for path %q", p)
	}
	v := s.view(m)
	return &response{data: map[string]any{
		"default_lease_ttl": seconds(v.defaultTTL),
		"max_lease_ttl":     seconds(v.maxTTL),
		"force_no_cache":    false,
		"description":       m.description,
		"options":           m.options,
	}}, nil
}

func (b *sysBackend) tune(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	var def, maxTTL time.Duration
	for _, f := range []struct {
		name string
		dst  *time.Duration
	}{{"default_lease_ttl", &def}, {"max_lease_ttl", &maxTTL}} {
		v, ok := r.data[f.name]
		if !ok || v == "" || v == "system" {
			continue
		}
		d, err := parseDurationSecond(v)
		if err != nil {
			return nil, badRequest("unable to parse %s: %s", f.name, err)
		}
		*f.dst = d
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.mounts[p]
	if m == nil {
		return nil, badRequest("cannot fetch sysview for path %q", p)
	}
	if r.data.has("default_lease_ttl") {
		m.defaultTTL = def
	}
	if r.data.has("max_lease_ttl") {
		m.maxTTL = maxTTL
	}
	return nil, nil
}

func (b *sysBackend) listAuth(r *request) (*response, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	data := map[string]any{}
	for p, m := range s.mounts {
		if m.isAuth() {
			data[strings.TrimPrefix(p, "auth/")] = m.info()
		}
	}
	return &response{data: data}, nil
}

func (b *sysBackend) readAuth(r *request) (*response, error) {
	p := "auth/" + sanitizeMountPath(r.vars["path"])
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.mounts[p]
	if m == nil {
		return nil, badRequest("No auth engine at %s", strings.TrimPrefix(p, "auth/"))
	}
	return &response{data: m.info()}, nil
}

// enableAuth enables an auth method (Vault's handleEnableAuth).
func (b *sysBackend) enableAuth(r *request) (*response, error) {
	s := b.s
	rel := sanitizeMountPath(r.vars["path"])
	p := "auth/" + rel
	typ, err := r.data.str("type")
	if err != nil {
		return nil, err
	}
	if typ == "" {
		return nil, badRequest("backend type must be specified as a string")
	}
	options, err := r.data.stringMap("options")
	if err != nil {
		return nil, err
	}
	if options["version"] != "" {
		return nil, badRequest("auth method %q does not allow setting a version", typ)
	}
	desc, _ := r.data.str("description")
	def, maxTTL, err := mountConfig(r.data)
	if err != nil {
		return nil, err
	}
	var be backend
	switch typ {
	case "approle":
		be = newAppRole(s)
	case "jwt", "oidc":
		be = newJWTAuth()
	case "kubernetes":
		be = newKubernetesAuth()
	default:
		return nil, badRequest("plugin not found in the catalog: %s", typ)
	}
	m := newMount(p, typ, desc, options, be)
	m.defaultTTL, m.maxTTL = def, maxTTL

	s.mu.Lock()
	defer s.mu.Unlock()
	if existing := s.conflictLocked(p); existing != "" {
		return nil, badRequest("path is already in use at %s", existing)
	}
	s.mounts[p] = m
	return nil, nil
}

// disableAuth disables an auth method and revokes the tokens it issued.
func (b *sysBackend) disableAuth(r *request) (*response, error) {
	s := b.s
	p := "auth/" + sanitizeMountPath(r.vars["path"])
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.mounts[p]
	if m == nil || m.typ == "token" {
		return nil, nil
	}
	s.revokeTokensUnderLocked(p)
	delete(s.mounts, p)
	return nil, nil
}

func (b *sysBackend) policyNames() []string {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	names := []string{"root"}
	for n := range s.policies {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (b *sysBackend) listPolicies(r *request) (*response, error) {
	return listResponse(b.policyNames()), nil
}

func (b *sysBackend) listPoliciesLegacy(r *request) (*response, error) {
	names := b.policyNames()
	return &response{data: map[string]any{"keys": names, "policies": names}}, nil
}

func (b *sysBackend) readPolicy(field string) handler {
	return func(r *request) (*response, error) {
		name := strings.ToLower(strings.TrimSpace(r.vars["name"]))
		s := b.s
		s.mu.Lock()
		defer s.mu.Unlock()
		p := s.policies[name]
		if p == nil {
			return nil, nil
		}
		return &response{data: map[string]any{"name": name, field: p.raw}}, nil
	}
}

// writePolicy stores an ACL policy (handlePoliciesSet). The text may be
// base64-encoded.
func (b *sysBackend) writePolicy(field string) handler {
	return func(r *request) (*response, error) {
		name := strings.ToLower(strings.TrimSpace(r.vars["name"]))
		text, err := r.data.str("policy")
		if err != nil {
			return nil, err
		}
		if text == "" && field == "rules" {
			if text, err = r.data.str("rules"); err != nil {
				return nil, err
			}
		}
		if text == "" {
			return nil, badRequest("'policy' parameter not supplied or empty")
		}
		if dec, err := base64.StdEncoding.DecodeString(text); err == nil {
			text = string(dec)
		}
		if name == "root" {
			return nil, badRequest("cannot update \"root\" policy")
		}
		p, err := parsePolicy(name, text)
		if err != nil {
			return nil, badRequest("%s", err)
		}
		s := b.s
		s.mu.Lock()
		s.policies[name] = p
		s.mu.Unlock()
		return nil, nil
	}
}

func (b *sysBackend) deletePolicy(r *request) (*response, error) {
	name := strings.ToLower(strings.TrimSpace(r.vars["name"]))
	switch name {
	case "default", "root":
		return nil, badRequest("cannot delete %q policy", name)
	}
	s := b.s
	s.mu.Lock()
	delete(s.policies, name)
	s.mu.Unlock()
	return nil, nil
}

func (b *sysBackend) capabilitiesSelf(r *request) (*response, error) {
	paths, err := r.data.commaStrings("paths")
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		if paths, err = r.data.commaStrings("path"); err != nil {
			return nil, err
		}
	}
	if len(paths) == 0 {
		return nil, badRequest("missing path")
	}
	a := b.s.aclFor(r.token)
	data := map[string]any{}
	for _, p := range paths {
		data[p] = a.capabilities(strings.TrimPrefix(p, "/"))
	}
	if len(paths) == 1 {
		data["capabilities"] = data[paths[0]]
	}
	return &response{data: data}, nil
}

// uiMount is sys/internal/ui/mounts/<path>: the mount serving path, if
// the token may access something in it (pathInternalUIMountRead).
func (b *sysBackend) uiMount(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	denied := coded(http.StatusForbidden, "preflight capability check returned 403, please ensure client's policies grant access to path %q", p)
	s.mu.Lock()
	m := s.matchMountLocked(p)
	s.mu.Unlock()
	if m == nil {
		return nil, denied
	}
	if r.token == nil {
		if r.client == "" {
			return nil, errPermissionDenied
		}
		return nil, errInvalidToken
	}
	if !s.aclFor(r.token).hasMountAccess(m.path) {
		return nil, denied
	}
	data := m.info()
	data["path"] = m.path
	return &response{data: data}, nil
}

// uiMounts is sys/internal/ui/mounts: the mounts the token can access.
func (b *sysBackend) uiMounts(r *request) (*response, error) {
	s := b.s
	secret, auth := map[string]any{}, map[string]any{}
	if r.token != nil {
		a := s.aclFor(r.token)
		s.mu.Lock()
		for p, m := range s.mounts {
			if !a.hasMountAccess(p) {
				continue
			}
			if m.isAuth() {
				auth[strings.TrimPrefix(p, "auth/")] = m.info()
			} else {
				secret[p] = m.info()
			}
		}
		s.mu.Unlock()
	}
	return &response{data: map[string]any{"secret": secret, "auth": auth}}, nil
}

func (b *sysBackend) leaseLookup(r *request) (*response, error) {
	id, err := r.data.str("lease_id")
	if err != nil {
		return nil, err
	}
	if id == "" {
		return nil, badRequest("lease_id must be specified")
	}
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.leases[id]
	if l == nil {
		return nil, badRequest("invalid lease")
	}
	now := time.Now()
	data := map[string]any{
		"id":           id,
		"issue_time":   l.issueTime,
		"expire_time":  nil,
		"last_renewal": nil,
		"ttl":          int64(0),
		"renewable":    l.renewable && l.revokeErr == "" && now.Before(l.expireTime),
	}
	if !l.lastRenewal.IsZero() {
		data["last_renewal"] = l.lastRenewal
	}
	if !l.expireTime.IsZero() {
		data["expire_time"] = l.expireTime
		data["ttl"] = int64(l.expireTime.Sub(now.Round(time.Second)).Seconds())
	}
	return &response{data: data}, nil
}

// leaseList lists lease IDs one level below a prefix, like a storage list.
func (b *sysBackend) leaseList(r *request) (*response, error) {
	prefix := r.vars["prefix"]
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	keys := []string{}
	for id := range s.leases {
		rest, ok := strings.CutPrefix(id, prefix)
		if !ok {
			continue
		}
		if i := strings.Index(rest, "/"); i >= 0 {
			rest = rest[:i+1]
		}
		if !seen[rest] {
			seen[rest] = true
			keys = append(keys, rest)
		}
	}
	sort.Strings(keys)
	return listResponse(keys), nil
}

func leaseIDArg(r *request) (string, error) {
	id, err := r.data.str("lease_id")
	if err != nil {
		return "", err
	}
	if id == "" {
		id = r.vars["url_lease_id"]
	}
	if id == "" {
		return "", badRequest("lease_id must be specified")
	}
	return id, nil
}

func (b *sysBackend) leaseRenew(r *request) (*response, error) {
	id, err := leaseIDArg(r)
	if err != nil {
		return nil, err
	}
	increment, err := r.data.duration("increment")
	if err != nil {
		return nil, err
	}
	return b.s.renewLease(r.ctx, id, increment)
}

func (b *sysBackend) leaseRevoke(r *request) (*response, error) {
	id, err := leaseIDArg(r)
	if err != nil {
		return nil, err
	}
	sync, err := r.data.boolean("sync", true)
	if err != nil {
		return nil, err
	}
	s := b.s
	if !sync {
		s.mu.Lock()
		if l := s.leases[id]; l != nil {
			s.lazyRevokeLocked(l)
		}
		s.mu.Unlock()
		return &response{status: http.StatusAccepted, empty: true}, nil
	}
	if err := s.revokeLease(r.ctx, id, false); err != nil {
		return nil, badRequest("%s", err)
	}
	return nil, nil
}

func (b *sysBackend) revokePrefix(force bool) handler {
	return func(r *request) (*response, error) {
		sync := true
		if !force {
			var err error
			if sync, err = r.data.boolean("sync", true); err != nil {
				return nil, err
			}
		}
		if err := b.s.revokePrefix(r.ctx, r.vars["prefix"], sync, force); err != nil {
			return nil, badRequest("%s", err)
		}
		if !sync {
			return &response{status: http.StatusAccepted, empty: true}, nil
		}
		return nil, nil
	}
}
