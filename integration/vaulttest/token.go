package vaulttest

import (
	"fmt"
	"maps"
	"regexp"
	"sort"
	"strings"
	"time"
)

// token is a service token and its lease, as Vault's TokenEntry plus the
// expiration manager's entry for it.
type token struct {
	id, accessor   string
	parent         string // "" for orphans
	policies       []string
	meta           map[string]string
	displayName    string
	path           string // creation path, e.g. "auth/token/create", "auth/approle/login"
	mount          *mount // the auth mount that issued it
	numUses        int    // uses left; 0 means unlimited
	usedUp         bool   // the last use was taken: revoke after the request
	creationTime   time.Time
	creationTTL    time.Duration
	explicitMaxTTL time.Duration
	period         time.Duration
	noLease        bool           // the root token: no expiry, not renewable
	internal       map[string]any // an auth method's InternalData, for renewal

	// Lease state (guarded by Server.mu, as are numUses and usedUp).
	issueTime   time.Time
	expireTime  time.Time // zero for non-expiring tokens
	lastRenewal time.Time
	renewable   bool
	authTTL     time.Duration // the auth's TTL, the renewal default for token-store tokens
	authMaxTTL  time.Duration
}

// expired reports whether the token's lease has run out.
func (t *token) expired(now time.Time) bool {
	return !t.expireTime.IsZero() && !now.Before(t.expireTime)
}

// checkToken resolves the request's token as Vault's CheckToken: no token
// is a bare "permission denied", an unknown or expired one adds "invalid
// token".
func (s *Server) checkToken(id string) (*token, error) {
	if id == "" {
		return nil, errPermissionDenied
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tokens[id]
	if t == nil || t.expired(time.Now()) || t.usedUp {
		return nil, errInvalidToken
	}
	return t, nil
}

// aclFor builds the ACL of a token's policies (nil token: no access).
func (s *Server) aclFor(t *token) *acl {
	if t == nil {
		return newACL(nil)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var ps []*policy
	for _, name := range t.policies {
		if name == "root" {
			ps = append(ps, &policy{name: "root"})
			continue
		}
		if p := s.policies[name]; p != nil {
			ps = append(ps, p)
		}
	}
	return newACL(ps)
}

// useToken takes one use of a limited-use token (Vault's UseToken), even
// when the request is then denied.
func (s *Server) useToken(t *token) {
	if t == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.numUses > 0 {
		t.numUses--
		if t.numUses == 0 {
			t.usedUp = true
		}
	}
}

// afterUse revokes a token whose last use was this request, with its
// leases, as Vault does once the request is done.
func (s *Server) afterUse(t *token) {
	if t == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.usedUp && s.tokens[t.id] == t {
		s.revokeTokenLocked(t)
	}
}

// revokeTokenLocked revokes t and its descendants, deepest first, and
// marks every lease created with them to expire now, as Vault's revokeTree
// and RevokeByToken (lazy revocation) do. The caller holds s.mu.
func (s *Server) revokeTokenLocked(t *token) {
	children := []*token{}
	for _, c := range s.tokens {
		if c.parent == t.id {
			children = append(children, c)
		}
	}
	for _, c := range children {
		s.revokeTokenLocked(c)
	}
	delete(s.tokens, t.id)
	delete(s.byAcc, t.accessor)
	now := time.Now()
	for _, l := range s.leases {
		if l.tokenID == t.id && l.expireTime.After(now) {
			l.expireTime = now
		}
	}
	s.nudge()
}

// newTokenLocked stores a new service token. The caller holds s.mu.
func (s *Server) newTokenLocked(t *token) {
	if t.id == "" {
		t.id = "hvs." + base62(24)
	}
	t.accessor = base62(24)
	s.tokens[t.id] = t
	s.byAcc[t.accessor] = t
}

// setLeaseLocked starts the token's lease with ttl (Vault's RegisterAuth).
func (s *Server) setLeaseLocked(t *token, ttl time.Duration, renewable bool) {
	now := time.Now()
	t.issueTime = now
	t.renewable = renewable
	t.authTTL = ttl
	t.creationTTL = ttl
	if ttl > 0 {
		t.expireTime = now.Add(ttl)
	}
	s.nudge()
}

// authResponse renders a token as the "auth" block of a response.
func authResponse(t *token, ttl time.Duration) map[string]any {
	meta := map[string]any(nil)
	if t.meta != nil {
		meta = map[string]any{}
		for k, v := range t.meta {
			meta[k] = v
		}
	}
	return map[string]any{
		"client_token":    t.id,
		"accessor":        t.accessor,
		"policies":        t.policies,
		"token_policies":  t.policies,
		"metadata":        meta,
		"lease_duration":  seconds(ttl),
		"renewable":       t.renewable,
		"entity_id":       "",
		"token_type":      "service",
		"orphan":          t.parent == "",
		"mfa_requirement": nil,
		"num_uses":        t.numUses,
	}
}

// loginToken creates the token for an auth method's login, as Vault's
// core does with a backend's logical.Auth: TTL per CalculateTTL against the
// auth mount, "default" added unless refused, and the display name
// prefixed with the mount path.
func (s *Server) loginToken(req *request, resp *response) error {
	l := resp.login
	ttl, warnings, err := calculateTTL(s.view(req.mount), 0, l.ttl, l.period, l.maxTTL, l.explicitMaxTTL, time.Time{})
	if err != nil {
		return err
	}
	resp.warnings = append(resp.warnings, warnings...)
	source := strings.ReplaceAll(strings.TrimPrefix(req.mount.path, "auth/"), "/", "-")
	t := &token{
		policies:       sanitizePolicies(l.policies, !l.noDefaultPolicy),
		meta:           l.metadata,
		displayName:    strings.TrimSuffix(source+l.displayName, "-"),
		path:           req.path,
		mount:          req.mount,
		numUses:        l.numUses,
		creationTime:   time.Now(),
		explicitMaxTTL: l.explicitMaxTTL,
		period:         l.period,
		internal:       l.internal,
	}
	if l.noDefaultPolicy {
		t.policies = removeString(t.policies, "default")
	}
	s.mu.Lock()
	s.newTokenLocked(t)
	s.setLeaseLocked(t, ttl, true)
	t.authMaxTTL = l.maxTTL
	resp.auth = authResponse(t, ttl)
	s.mu.Unlock()
	return nil
}

func removeString(list []string, s string) []string {
	out := list[:0:0]
	for _, e := range list {
		if e != s {
			out = append(out, e)
		}
	}
	return out
}

// tokenBackend is the token store mounted at auth/token/.
func (s *Server) tokenBackend() backend { return &tokenStore{s: s} }

type tokenStore struct{ s *Server }

func (ts *tokenStore) routes() []*route {
	create := newRoute(`create`, map[op]handler{opUpdate: ts.create(false)})
	orphan := newRoute(`create-orphan`, map[op]handler{opUpdate: ts.create(true)})
	return []*route{
		create, orphan,
		newRoute(`lookup`, map[op]handler{opRead: ts.lookup, opUpdate: ts.lookup}),
		newRoute(`lookup/(?P<token>.+)`, map[op]handler{opRead: ts.lookup}),
		newRoute(`lookup-self`, map[op]handler{opRead: ts.lookupSelf}),
		newRoute(`lookup-accessor`, map[op]handler{opUpdate: ts.lookupAccessor}),
		newRoute(`renew`, map[op]handler{opUpdate: ts.renew}),
		newRoute(`renew/(?P<token>.+)`, map[op]handler{opUpdate: ts.renew}),
		newRoute(`renew-self`, map[op]handler{opUpdate: ts.renewSelf}),
		newRoute(`revoke`, map[op]handler{opUpdate: ts.revoke}),
		newRoute(`revoke-self`, map[op]handler{opUpdate: ts.revokeSelf}),
		newRoute(`revoke-accessor`, map[op]handler{opUpdate: ts.revokeAccessor}),
	}
}

var displayNameSanitize = regexp.MustCompile(`[^a-zA-Z0-9-]`)

// create is auth/token/create and create-orphan (handleCreateCommon).
func (ts *tokenStore) create(orphan bool) handler {
	return func(r *request) (*response, error) {
		s := ts.s
		parent := r.token
		s.mu.Lock()
		restricted := parent.numUses > 0 || parent.usedUp
		parentExpires := !parent.expireTime.IsZero()
		s.mu.Unlock()
		if restricted {
			return nil, badRequest("restricted use token cannot generate child tokens")
		}
		isSudo := s.aclFor(parent).allows(r.path, opUpdate, true)

		policies, err := r.data.commaStrings("policies")
		if err != nil {
			return nil, err
		}
		meta, err := r.data.stringMap("meta")
		if err != nil {
			return nil, err
		}
		noParent, err := r.data.boolean("no_parent", false)
		if err != nil {
			return nil, err
		}
		noDefault, err := r.data.boolean("no_default_policy", false)
		if err != nil {
			return nil, err
		}
		renewable, err := r.data.boolean("renewable", true)
		if err != nil {
			return nil, err
		}
		numUses, err := r.data.integer("num_uses")
		if err != nil {
			return nil, err
		}
		if numUses < 0 {
			return nil, badRequest("number of uses cannot be negative")
		}
		displayName, err := r.data.str("display_name")
		if err != nil {
			return nil, err
		}
		id, err := r.data.str("id")
		if err != nil {
			return nil, err
		}
		switch typ, _ := r.data.str("type"); typ {
		case "", "service":
		case "batch":
			return nil, badRequest("vaulttest: batch tokens are not supported")
		default:
			return nil, badRequest("invalid 'token_type' value")
		}

		t := &token{
			parent:       parent.id,
			path:         r.path,
			meta:         meta,
			displayName:  "token",
			numUses:      numUses,
			creationTime: time.Now(),
			mount:        r.mount,
		}
		if displayName != "" {
			full := displayNameSanitize.ReplaceAllString("token-"+displayName, "-")
			t.displayName = strings.TrimSuffix(full, "-")
		}
		if id != "" {
			if !isSudo {
				return nil, badRequest("root or sudo privileges required to specify token id")
			}
			t.id = id
		}

		addDefault := false
		switch {
		case len(policies) == 0:
			policies = sanitizePolicies(parent.policies, false)
		case !isSudo:
			in := sanitizePolicies(policies, false)
			par := sanitizePolicies(parent.policies, false)
			if !subset(par, in) {
				return nil, badRequest("child policies must be subset of parent")
			}
			addDefault = !noDefault && contains(parent.policies, "default")
		default:
			addDefault = !noDefault
		}
		t.policies = sanitizePolicies(policies, addDefault)
		if noDefault {
			t.policies = removeString(t.policies, "default")
		}
		if contains(t.policies, "root") && !contains(parent.policies, "root") {
			return nil, badRequest("root tokens may not be created without parent token being root")
		}
		switch {
		case noParent:
			if !isSudo {
				return nil, badRequest("root or sudo privileges required to create orphan token")
			}
			t.parent = ""
		case orphan:
			t.parent = ""
		}

		if t.explicitMaxTTL, err = tokenDuration(r.data, "explicit_max_ttl"); err != nil {
			return nil, err
		}
		if t.period, err = tokenDuration(r.data, "period"); err != nil {
			return nil, err
		}
		if t.period > 0 && !isSudo {
			return nil, badRequest("root or sudo privileges required to create periodic token")
		}
		ttl, err := tokenDuration(r.data, "ttl")
		if err != nil {
			return nil, err
		}
		if ttl == 0 && r.data.has("lease") {
			lease, _ := r.data.str("lease")
			d, err := time.ParseDuration(lease)
			if err != nil {
				return nil, badRequest("%s", err)
			}
			ttl = d
		}

		resp := &response{}
		if t.period > 0 || ttl > 0 || !contains(t.policies, "root") {
			ttl, resp.warnings, err = calculateTTL(s.view(r.mount), 0, ttl, t.period, 0, t.explicitMaxTTL, t.creationTime)
			if err != nil {
				return nil, err
			}
		}
		if ttl == 0 && t.explicitMaxTTL > 0 {
			ttl = t.explicitMaxTTL
		}
		if ttl == 0 {
			if parentExpires {
				return nil, badRequest("expiring root tokens cannot create non-expiring root tokens")
			}
			renewable = false
			t.noLease = true
		}

		s.mu.Lock()
		defer s.mu.Unlock()
		if t.id != "" && s.tokens[t.id] != nil {
			return nil, badRequest("cannot create a token with a duplicate ID")
		}
		s.newTokenLocked(t)
		if !t.noLease {
			s.setLeaseLocked(t, ttl, renewable)
		} else {
			t.issueTime = time.Now()
		}
		resp.auth = authResponse(t, ttl)
		for _, p := range t.policies {
			if p != "root" && s.policies[p] == nil {
				resp.addWarning("Policy %q does not exist", p)
			}
		}
		return resp, nil
	}
}

// tokenDuration parses a token-store duration: a number of seconds or a
// duration string, never negative.
func tokenDuration(d fields, name string) (time.Duration, error) {
	if !d.has(name) {
		return 0, nil
	}
	v := d[name]
	dur, err := parseDurationSecond(v)
	if err != nil {
		return 0, badRequest("%s", err)
	}
	if dur < 0 {
		return 0, badRequest("%s must be positive", name)
	}
	return dur, nil
}

func subset(super, sub []string) bool {
	for _, e := range sub {
		if !contains(super, e) {
			return false
		}
	}
	return true
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}

// lookupData renders a token as auth/token/lookup does (handleLookup).
func lookupData(t *token) map[string]any {
	var meta map[string]string
	if t.meta != nil {
		meta = maps.Clone(t.meta)
	}
	data := map[string]any{
		"id":               t.id,
		"accessor":         t.accessor,
		"policies":         t.policies,
		"path":             t.path,
		"meta":             meta,
		"display_name":     t.displayName,
		"num_uses":         t.numUses,
		"orphan":           t.parent == "",
		"creation_time":    t.creationTime.Unix(),
		"creation_ttl":     seconds(t.creationTTL),
		"expire_time":      nil,
		"ttl":              int64(0),
		"explicit_max_ttl": seconds(t.explicitMaxTTL),
		"entity_id":        "",
		"type":             "service",
	}
	if t.period != 0 {
		data["period"] = seconds(t.period)
	}
	if t.noLease {
		return data // the root token has no lease entry
	}
	if !t.lastRenewal.IsZero() {
		data["last_renewal_time"] = t.lastRenewal.Unix()
		data["last_renewal"] = t.lastRenewal
	}
	if !t.expireTime.IsZero() {
		data["expire_time"] = t.expireTime
		data["ttl"] = int64(t.expireTime.Sub(time.Now().Round(time.Second)).Seconds())
	}
	data["renewable"] = t.renewable && !t.expireTime.IsZero() && time.Now().Before(t.expireTime)
	data["issue_time"] = t.issueTime
	return data
}

func (ts *tokenStore) lookupSelf(r *request) (*response, error) {
	return ts.lookupID(r.token.id)
}

func (ts *tokenStore) lookup(r *request) (*response, error) {
	id, err := r.data.str("token")
	if err != nil {
		return nil, err
	}
	if v := r.vars["token"]; v != "" {
		id = v
	}
	if id == "" {
		id = r.token.id
	}
	return ts.lookupID(id)
}

func (ts *tokenStore) lookupID(id string) (*response, error) {
	s := ts.s
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tokens[id]
	if t == nil || t.expired(time.Now()) {
		return nil, coded(403, "bad token")
	}
	return &response{data: lookupData(t)}, nil
}

func (ts *tokenStore) lookupAccessor(r *request) (*response, error) {
	acc, err := r.data.str("accessor")
	if err != nil {
		return nil, err
	}
	if acc == "" {
		return nil, badRequest("missing accessor")
	}
	ts.s.mu.Lock()
	t := ts.s.byAcc[acc]
	ts.s.mu.Unlock()
	if t == nil {
		return nil, badRequest("invalid accessor")
	}
	resp, err := ts.lookupID(t.id)
	if err == nil {
		resp.data["id"] = ""
	}
	return resp, err
}

func (ts *tokenStore) renewSelf(r *request) (*response, error) {
	return ts.renewID(r, r.token.id)
}

func (ts *tokenStore) renew(r *request) (*response, error) {
	id, err := r.data.str("token")
	if err != nil {
		return nil, err
	}
	if v := r.vars["token"]; v != "" {
		id = v
	}
	if id == "" {
		return nil, badRequest("missing token ID")
	}
	return ts.renewID(r, id)
}

// renewID is Vault's ExpirationManager.RenewToken: the auth's TTL (or, for
// auth methods, the role's token_ttl) or the increment, capped by the max
// TTL measured from the token's issue time.
func (ts *tokenStore) renewID(r *request, id string) (*response, error) {
	s := ts.s
	increment, err := r.data.duration("increment")
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	t := s.tokens[id]
	now := time.Now()
	if t == nil || t.expired(now) {
		s.mu.Unlock()
		return nil, badRequest("token not found")
	}
	if t.noLease {
		s.mu.Unlock()
		return nil, badRequest("invalid lease ID")
	}
	if !t.renewable {
		s.mu.Unlock()
		return nil, badRequest("lease is not renewable")
	}
	ttlBase, maxTTL, period := t.authTTL, t.authMaxTTL, t.period
	m := t.mount
	s.mu.Unlock()

	if ar, ok := m.be.(authRenewer); ok {
		ttlBase, maxTTL, period, err = ar.renewAuth(t)
		if err != nil {
			return nil, fmt.Errorf("failed to renew entry: %w", err) // a 500, as in Vault
		}
	}
	ttl, warnings, err := calculateTTL(s.view(m), increment, ttlBase, period, maxTTL, t.explicitMaxTTL, t.issueTime)
	if err != nil {
		return nil, err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tokens[id] != t {
		return nil, badRequest("token not found")
	}
	t.authTTL, t.authMaxTTL = ttl, maxTTL
	t.lastRenewal = time.Now()
	t.expireTime = t.lastRenewal.Add(ttl)
	s.nudge()
	return &response{warnings: warnings, auth: authResponse(t, ttl)}, nil
}

func (ts *tokenStore) revokeSelf(r *request) (*response, error) {
	ts.s.mu.Lock()
	defer ts.s.mu.Unlock()
	if t := ts.s.tokens[r.token.id]; t != nil {
		ts.s.revokeTokenLocked(t)
	}
	return nil, nil
}

func (ts *tokenStore) revoke(r *request) (*response, error) {
	id, err := r.data.str("token")
	if err != nil {
		return nil, err
	}
	if id == "" {
		return nil, badRequest("missing token ID")
	}
	ts.s.mu.Lock()
	defer ts.s.mu.Unlock()
	if t := ts.s.tokens[id]; t != nil {
		ts.s.revokeTokenLocked(t)
	}
	return nil, nil
}

func (ts *tokenStore) revokeAccessor(r *request) (*response, error) {
	acc, err := r.data.str("accessor")
	if err != nil {
		return nil, err
	}
	if acc == "" {
		return nil, badRequest("missing accessor")
	}
	ts.s.mu.Lock()
	defer ts.s.mu.Unlock()
	t := ts.s.byAcc[acc]
	if t == nil {
		return nil, badRequest("invalid accessor")
	}
	ts.s.revokeTokenLocked(t)
	return nil, nil
}

// expireTokensLocked revokes every expired token; it returns the next
// token expiry. The caller holds s.mu.
func (s *Server) expireTokensLocked(now time.Time) time.Time {
	var expired []*token
	var next time.Time
	for _, t := range s.tokens {
		switch {
		case t.expireTime.IsZero():
		case t.expired(now):
			expired = append(expired, t)
		case next.IsZero() || t.expireTime.Before(next):
			next = t.expireTime
		}
	}
	sort.Slice(expired, func(i, j int) bool { return expired[i].expireTime.Before(expired[j].expireTime) })
	for _, t := range expired {
		if s.tokens[t.id] == t {
			s.revokeTokenLocked(t)
		}
	}
	return next
}

// revokeTokensUnderLocked revokes the tokens created under an auth mount,
// as disabling an auth method does. The caller holds s.mu.
func (s *Server) revokeTokensUnderLocked(prefix string) {
	for _, t := range s.tokens {
		if strings.HasPrefix(t.path, prefix) && s.tokens[t.id] == t {
			s.revokeTokenLocked(t)
		}
	}
}

// roleGone is the error of an auth method's renewal once the token's role
// has been deleted, as the plugins' pathLoginRenew return it.
func roleGone(kind, name string) error {
	return fmt.Errorf("%s %q does not exist during renewal", kind, name)
}
