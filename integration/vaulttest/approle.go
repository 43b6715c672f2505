package vaulttest

import (
	"maps"
	"net/http"
	"strings"
	"sync"
	"time"
)

// tokenParams are the token_* fields auth method roles share (Vault's
// tokenutil.TokenParams).
type tokenParams struct {
	policies        []string
	ttl, maxTTL     time.Duration
	explicitMaxTTL  time.Duration
	period          time.Duration
	numUses         int
	noDefaultPolicy bool
}

// parse reads the token_* fields, keeping current values for fields the
// request leaves out. The deprecated "policies", "ttl", "max_ttl" and
// "period" are accepted as Vault does.
func (p *tokenParams) parse(d fields) error {
	var err error
	for _, name := range []string{"token_policies", "policies"} {
		if d.has(name) {
			if p.policies, err = d.commaStrings(name); err != nil {
				return err
			}
			break
		}
	}
	durs := []struct {
		names []string
		dst   *time.Duration
	}{
		{[]string{"token_ttl", "ttl"}, &p.ttl},
		{[]string{"token_max_ttl", "max_ttl"}, &p.maxTTL},
		{[]string{"token_explicit_max_ttl"}, &p.explicitMaxTTL},
		{[]string{"token_period", "period"}, &p.period},
	}
	for _, f := range durs {
		for _, name := range f.names {
			if d.has(name) {
				if *f.dst, err = d.duration(name); err != nil {
					return err
				}
				break
			}
		}
	}
	if d.has("token_num_uses") {
		if p.numUses, err = d.integer("token_num_uses"); err != nil {
			return err
		}
	}
	if d.has("token_no_default_policy") {
		if p.noDefaultPolicy, err = d.boolean("token_no_default_policy", false); err != nil {
			return err
		}
	}
	if typ, _ := d.str("token_type"); typ != "" && typ != "default" && typ != "service" && typ != "default-service" {
		return badRequest("vaulttest: token_type %q is not supported", typ)
	}
	if p.maxTTL > 0 && p.ttl > p.maxTTL {
		return badRequest("'token_ttl' cannot be greater than 'token_max_ttl'")
	}
	return nil
}

// render adds the token_* fields to a role read.
func (p *tokenParams) render(data map[string]any) {
	pol := nonNil(p.policies)
	data["token_policies"] = pol
	data["policies"] = pol
	data["token_ttl"] = seconds(p.ttl)
	data["token_max_ttl"] = seconds(p.maxTTL)
	data["token_explicit_max_ttl"] = seconds(p.explicitMaxTTL)
	data["token_period"] = seconds(p.period)
	data["period"] = seconds(p.period)
	data["token_num_uses"] = p.numUses
	data["token_no_default_policy"] = p.noDefaultPolicy
	data["token_type"] = "default"
	data["token_bound_cidrs"] = []string{}
}

// login fills a loginSpec from the role (PopulateTokenAuth).
func (p *tokenParams) login(l *loginSpec) {
	l.policies = p.policies
	l.noDefaultPolicy = p.noDefaultPolicy
	l.ttl, l.maxTTL = p.ttl, p.maxTTL
	l.explicitMaxTTL, l.period, l.numUses = p.explicitMaxTTL, p.period, p.numUses
}

// appRole is the AppRole auth method.
type appRole struct {
	s         *Server
	mu        sync.Mutex
	roles     map[string]*appRoleRole // by lowercased name
	secretIDs map[string]*secretID    // by secret ID
}

type appRoleRole struct {
	name            string
	roleID          string
	bindSecretID    bool
	secretIDTTL     time.Duration
	secretIDNumUses int
	token           tokenParams
}

type secretID struct {
	role       string
	accessor   string
	numUses    int // uses left; 0 means unlimited
	ttl        time.Duration
	created    time.Time
	expiration time.Time // zero: never
	metadata   map[string]string
}

func newAppRole(s *Server) *appRole {
	return &appRole{s: s, roles: map[string]*appRoleRole{}, secretIDs: map[string]*secretID{}}
}

func (a *appRole) routes() []*route {
	role := newRoute(`role/`+nameRegex("role_name"), map[op]handler{opRead: a.readRole, opUpdate: a.writeRole, opDelete: a.deleteRole})
	role.exists = func(r *request) bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.roles[strings.ToLower(r.vars["role_name"])] != nil
	}
	login := newRoute(`login`, map[op]handler{opUpdate: a.login})
	login.unauth = true
	return []*route{
		newRoute(`role/?`, map[op]handler{opList: a.listRoles}),
		role,
		newRoute(`role/`+nameRegex("role_name")+`/role-id`, map[op]handler{opRead: a.readRoleID, opUpdate: a.writeRoleID}),
		newRoute(`role/`+nameRegex("role_name")+`/secret-id/?`, map[op]handler{opUpdate: a.newSecretID, opList: a.listSecretIDs}),
		newRoute(`role/`+nameRegex("role_name")+`/custom-secret-id`, map[op]handler{opUpdate: a.customSecretID}),
		login,
	}
}

func (a *appRole) listRoles(r *request) (*response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return listResponse(sortedKeys(a.roles)), nil
}

func (a *appRole) readRole(r *request) (*response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	role := a.roles[strings.ToLower(r.vars["role_name"])]
	if role == nil {
		return nil, nil
	}
	data := map[string]any{
		"bind_secret_id":        role.bindSecretID,
		"secret_id_ttl":         seconds(role.secretIDTTL),
		"secret_id_num_uses":    role.secretIDNumUses,
		"secret_id_bound_cidrs": []string{},
		"local_secret_ids":      false,
	}
	role.token.render(data)
	return &response{data: data}, nil
}

// writeRole creates or updates a role (pathRoleCreateUpdate).
func (a *appRole) writeRole(r *request) (*response, error) {
	name := strings.ToLower(r.vars["role_name"])
	a.mu.Lock()
	old := a.roles[name]
	a.mu.Unlock()
	role := &appRoleRole{name: name, roleID: newUUID(), bindSecretID: true}
	if old != nil {
		cp := *old
		role = &cp
	}
	var err error
	if r.data.has("bind_secret_id") {
		if role.bindSecretID, err = r.data.boolean("bind_secret_id", true); err != nil {
			return nil, err
		}
	}
	if r.data.has("secret_id_ttl") {
		if role.secretIDTTL, err = r.data.duration("secret_id_ttl"); err != nil {
			return nil, err
		}
	}
	if r.data.has("secret_id_num_uses") {
		if role.secretIDNumUses, err = r.data.integer("secret_id_num_uses"); err != nil {
			return nil, err
		}
		if role.secretIDNumUses < 0 {
			return nil, badRequest("secret_id_num_uses cannot be negative")
		}
	}
	if r.data.has("role_id") {
		if role.roleID, err = r.data.str("role_id"); err != nil {
			return nil, err
		}
		if role.roleID == "" {
			return nil, badRequest("invalid role_id supplied, or failed to generate a role_id")
		}
	}
	if err := role.token.parse(r.data); err != nil {
		return nil, err
	}
	if !role.bindSecretID {
		return nil, badRequest("at least one constraint should be enabled on the role")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for n, other := range a.roles {
		if n != name && other.roleID == role.roleID {
			return nil, badRequest("role_id already in use")
		}
	}
	a.roles[name] = role
	return nil, nil
}

func (a *appRole) deleteRole(r *request) (*response, error) {
	name := strings.ToLower(r.vars["role_name"])
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.roles, name)
	for id, sid := range a.secretIDs {
		if sid.role == name {
			delete(a.secretIDs, id)
		}
	}
	return nil, nil
}

func (a *appRole) readRoleID(r *request) (*response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	role := a.roles[strings.ToLower(r.vars["role_name"])]
	if role == nil {
		return nil, nil
	}
	return &response{data: map[string]any{"role_id": role.roleID}}, nil
}

func (a *appRole) writeRoleID(r *request) (*response, error) {
	id, err := r.data.str("role_id")
	if err != nil {
		return nil, err
	}
	if id == "" {
		return nil, badRequest("missing role_id")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	role := a.roles[strings.ToLower(r.vars["role_name"])]
	if role == nil {
		return nil, nil
	}
	role.roleID = id
	return nil, nil
}

func (a *appRole) newSecretID(r *request) (*response, error) {
	return a.issueSecretID(r, newUUID())
}

func (a *appRole) customSecretID(r *request) (*response, error) {
	id, err := r.data.str("secret_id")
	if err != nil {
		return nil, err
	}
	return a.issueSecretID(r, id)
}

// issueSecretID is handleRoleSecretIDCommon.
func (a *appRole) issueSecretID(r *request, id string) (*response, error) {
	name := strings.ToLower(r.vars["role_name"])
	if id == "" {
		return nil, badRequest("missing secret_id")
	}
	metadata := map[string]string{}
	if raw, _ := r.data.str("metadata"); raw != "" {
		for _, kv := range strings.Split(raw, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, badRequest("failed to parse metadata: invalid key/value pair %q", kv)
			}
			metadata[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	role := a.roles[name]
	if role == nil {
		return nil, coded(http.StatusNotFound, "role %q does not exist", name)
	}
	numUses := role.secretIDNumUses
	if r.data.has("num_uses") {
		n, err := r.data.integer("num_uses")
		if err != nil {
			return nil, err
		}
		if n < 0 {
			return nil, badRequest("num_uses cannot be negative")
		}
		if (n == 0 && role.secretIDNumUses > 0) || (role.secretIDNumUses > 0 && n > role.secretIDNumUses) {
			return nil, badRequest("num_uses cannot be higher than the role's secret_id_num_uses")
		}
		numUses = n
	}
	ttl := role.secretIDTTL
	if r.data.has("ttl") {
		d, err := r.data.duration("ttl")
		if err != nil {
			return nil, err
		}
		if (d == 0 && role.secretIDTTL > 0) || (role.secretIDTTL > 0 && d > role.secretIDTTL) {
			return nil, badRequest("ttl cannot be longer than the role's secret_id_ttl")
		}
		ttl = d
	}
	if _, taken := a.secretIDs[id]; taken {
		return nil, badRequest("SecretID is already registered")
	}
	now := time.Now()
	sid := &secretID{role: name, accessor: newUUID(), numUses: numUses, ttl: ttl, created: now, metadata: metadata}
	if ttl > 0 {
		sid.expiration = now.Add(ttl)
	}
	a.secretIDs[id] = sid
	return &response{data: map[string]any{
		"secret_id":          id,
		"secret_id_accessor": sid.accessor,
		"secret_id_ttl":      seconds(ttl),
		"secret_id_num_uses": numUses,
	}}, nil
}

func (a *appRole) listSecretIDs(r *request) (*response, error) {
	name := strings.ToLower(r.vars["role_name"])
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.roles[name] == nil {
		return nil, badRequest("role %q does not exist", name)
	}
	var accessors []string
	now := time.Now()
	for _, sid := range a.secretIDs {
		if sid.role == name && (sid.expiration.IsZero() || now.Before(sid.expiration)) {
			accessors = append(accessors, sid.accessor)
		}
	}
	return listResponse(accessors), nil
}

// login is pathLoginUpdate.
func (a *appRole) login(r *request) (*response, error) {
	roleID, err := r.data.str("role_id")
	if err != nil {
		return nil, err
	}
	roleID = strings.TrimSpace(roleID)
	if roleID == "" {
		return nil, badRequest("missing role_id")
	}
	secret, err := r.data.str("secret_id")
	if err != nil {
		return nil, err
	}
	secret = strings.TrimSpace(secret)

	a.mu.Lock()
	defer a.mu.Unlock()
	var role *appRoleRole
	for _, candidate := range a.roles {
		if candidate.roleID == roleID {
			role = candidate
			break
		}
	}
	if role == nil {
		return nil, badRequest("invalid role or secret ID")
	}
	metadata := map[string]string{}
	if role.bindSecretID {
		if secret == "" {
			return nil, badRequest("missing secret_id")
		}
		sid := a.secretIDs[secret]
		if sid == nil || sid.role != role.name {
			return nil, badRequest("invalid role or secret ID")
		}
		if !sid.expiration.IsZero() && !time.Now().Before(sid.expiration) {
			delete(a.secretIDs, secret)
			return nil, badRequest("invalid role or secret ID")
		}
		if sid.numUses > 0 {
			sid.numUses--
			if sid.numUses == 0 {
				delete(a.secretIDs, secret)
			}
		}
		metadata = maps.Clone(sid.metadata)
	}
	metadata["role_name"] = role.name
	l := &loginSpec{metadata: metadata, internal: map[string]any{"role_name": role.name}}
	role.token.login(l)
	return &response{login: l}, nil
}

// renewAuth is pathLoginRenew: the role must still exist and its token
// settings apply to the renewal.
func (a *appRole) renewAuth(t *token) (time.Duration, time.Duration, time.Duration, error) {
	name, _ := t.internal["role_name"].(string)
	a.mu.Lock()
	defer a.mu.Unlock()
	role := a.roles[name]
	if role == nil {
		return 0, 0, 0, roleGone("role", name)
	}
	return role.token.ttl, role.token.maxTTL, role.token.period, nil
}
