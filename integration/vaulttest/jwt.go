package vaulttest

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
)

// allSigningAlgs are the algorithms accepted for static keys when the
// config names none.
var allSigningAlgs = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512,
	jose.PS256, jose.PS384, jose.PS512, jose.EdDSA,
}

const claimDefaultLeeway = 150 * time.Second // the jwt plugin's claimDefaultLeeway

// parsePublicKeyPEM is certutil.ParsePublicKeyPEM: a PKIX public key, a
// PKCS#1 RSA public key, or a certificate's key.
func parsePublicKeyPEM(data string) (crypto.PublicKey, error) {
	block, _ := pem.Decode([]byte(data))
	if block == nil {
		return nil, errors.New("data does not contain any valid public keys")
	}
	if k, err := x509.ParsePKIXPublicKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PublicKey(block.Bytes); err == nil {
		return k, nil
	}
	if c, err := x509.ParseCertificate(block.Bytes); err == nil {
		return c.PublicKey, nil
	}
	return nil, errors.New("data does not contain any valid public keys")
}

// verifySigned parses a compact JWS and returns its claims, decoded twice
// as the plugin does: the registered claims and all of them.
func verifySigned(raw string, algs []jose.SignatureAlgorithm, keys []crypto.PublicKey) (*josejwt.Claims, map[string]any, error, error) {
	parsed, err := josejwt.ParseSigned(raw, algs)
	if err != nil {
		return nil, nil, err, nil
	}
	for _, k := range keys {
		var claims josejwt.Claims
		all := map[string]any{}
		if err := parsed.Claims(k, &claims, &all); err == nil {
			return &claims, all, nil, nil
		}
	}
	return nil, nil, nil, errors.New("no known key successfully validated the token signature")
}

func parseAlgs(names []string) ([]jose.SignatureAlgorithm, error) {
	if len(names) == 0 {
		return allSigningAlgs, nil
	}
	var out []jose.SignatureAlgorithm
	for _, n := range names {
		ok := false
		for _, a := range allSigningAlgs {
			if string(a) == n {
				ok = true
			}
		}
		if !ok {
			return nil, fmt.Errorf("invalid jwt_supported_algs: %s", n)
		}
		out = append(out, jose.SignatureAlgorithm(n))
	}
	return out, nil
}

// jwtAuth is the JWT/OIDC auth method with static validation keys.
type jwtAuth struct {
	mu     sync.Mutex
	config *jwtConfig
	roles  map[string]*jwtRole
}

type jwtConfig struct {
	pubKeysPEM  []string
	pubKeys     []crypto.PublicKey
	boundIssuer string
	algNames    []string
	algs        []jose.SignatureAlgorithm
	defaultRole string
}

type jwtRole struct {
	roleType                          string
	boundAudiences                    []string
	userClaim                         string
	boundSubject                      string
	boundClaims                       map[string]any
	claimMappings                     map[string]string
	allowedRedirectURIs               []string
	expirationLeeway, notBeforeLeeway time.Duration
	clockSkewLeeway                   time.Duration
	token                             tokenParams
}

func newJWTAuth() *jwtAuth { return &jwtAuth{roles: map[string]*jwtRole{}} }

func (j *jwtAuth) routes() []*route {
	role := newRoute(`role/`+nameRegex("name"), map[op]handler{opRead: j.readRole, opUpdate: j.writeRole, opDelete: j.deleteRole})
	role.exists = func(r *request) bool {
		j.mu.Lock()
		defer j.mu.Unlock()
		return j.roles[strings.ToLower(r.vars["name"])] != nil
	}
	login := newRoute(`login`, map[op]handler{opUpdate: j.login})
	login.unauth = true
	return []*route{
		newRoute(`config`, map[op]handler{opRead: j.readConfig, opUpdate: j.writeConfig}),
		newRoute(`role/?`, map[op]handler{opList: j.listRoles}),
		role,
		login,
	}
}

func (j *jwtAuth) readConfig(r *request) (*response, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	c := j.config
	if c == nil {
		return nil, nil
	}
	return &response{data: map[string]any{
		"jwt_validation_pubkeys": nonNil(c.pubKeysPEM),
		"bound_issuer":           c.boundIssuer,
		"jwt_supported_algs":     nonNil(c.algNames),
		"default_role":           c.defaultRole,
		"oidc_discovery_url":     "",
		"oidc_discovery_ca_pem":  "",
		"oidc_client_id":         "",
		"jwks_url":               "",
		"jwks_ca_pem":            "",
		"namespace_in_state":     true,
		"provider_config":        map[string]any{},
	}}, nil
}

// writeConfig is pathConfigWrite, for jwt_validation_pubkeys.
func (j *jwtAuth) writeConfig(r *request) (*response, error) {
	c := &jwtConfig{}
	var err error
	if c.pubKeysPEM, err = r.data.commaStrings("jwt_validation_pubkeys"); err != nil {
		return nil, err
	}
	if c.boundIssuer, err = r.data.str("bound_issuer"); err != nil {
		return nil, err
	}
	if c.defaultRole, err = r.data.str("default_role"); err != nil {
		return nil, err
	}
	c.defaultRole = strings.ToLower(c.defaultRole)
	if c.algNames, err = r.data.commaStrings("jwt_supported_algs"); err != nil {
		return nil, err
	}
	methods := 0
	for _, name := range []string{"oidc_discovery_url", "jwks_url", "jwks_pairs"} {
		if v, _ := r.data.str(name); v != "" || (name == "jwks_pairs" && r.data.has(name)) {
			methods++
		}
	}
	if len(c.pubKeysPEM) > 0 {
		methods++
	}
	if methods != 1 {
		return nil, badRequest("exactly one of 'oidc_discovery_url', 'jwks_url', 'jwks_pairs' or 'jwt_validation_pubkeys' must be set")
	}
	if len(c.pubKeysPEM) == 0 {
		return nil, badRequest("vaulttest: only jwt_validation_pubkeys is supported, not OIDC discovery or JWKS URLs")
	}
	for _, p := range c.pubKeysPEM {
		k, err := parsePublicKeyPEM(p)
		if err != nil {
			return nil, badRequest("error parsing public key: %s", err)
		}
		c.pubKeys = append(c.pubKeys, k)
	}
	if c.algs, err = parseAlgs(c.algNames); err != nil {
		return nil, badRequest("%s", err)
	}
	j.mu.Lock()
	j.config = c
	j.mu.Unlock()
	return nil, nil
}

func (j *jwtAuth) listRoles(r *request) (*response, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return listResponse(sortedKeys(j.roles)), nil
}

func (j *jwtAuth) readRole(r *request) (*response, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	role := j.roles[strings.ToLower(r.vars["name"])]
	if role == nil {
		return nil, nil
	}
	data := map[string]any{
		"role_type":               role.roleType,
		"bound_audiences":         nonNil(role.boundAudiences),
		"user_claim":              role.userClaim,
		"bound_subject":           role.boundSubject,
		"bound_claims":            role.boundClaims,
		"bound_claims_type":       "string",
		"claim_mappings":          role.claimMappings,
		"allowed_redirect_uris":   nonNil(role.allowedRedirectURIs),
		"expiration_leeway":       seconds(role.expirationLeeway),
		"not_before_leeway":       seconds(role.notBeforeLeeway),
		"clock_skew_leeway":       seconds(role.clockSkewLeeway),
		"groups_claim":            "",
		"oidc_scopes":             []string{},
		"verbose_oidc_logging":    false,
		"user_claim_json_pointer": false,
	}
	role.token.render(data)
	return &response{data: data}, nil
}

// writeRole is pathRoleCreateUpdate.
func (j *jwtAuth) writeRole(r *request) (*response, error) {
	name := strings.ToLower(r.vars["name"])
	j.mu.Lock()
	old := j.roles[name]
	j.mu.Unlock()
	role := &jwtRole{roleType: "oidc"}
	if old != nil {
		cp := *old
		role = &cp
	}
	var err error
	if r.data.has("role_type") {
		if role.roleType, err = r.data.str("role_type"); err != nil {
			return nil, err
		}
	}
	switch role.roleType {
	case "jwt", "oidc":
	default:
		return nil, badRequest("invalid 'role_type': %s", role.roleType)
	}
	strs := []struct {
		name string
		dst  *[]string
	}{{"bound_audiences", &role.boundAudiences}, {"allowed_redirect_uris", &role.allowedRedirectURIs}}
	for _, f := range strs {
		if r.data.has(f.name) {
			if *f.dst, err = r.data.commaStrings(f.name); err != nil {
				return nil, err
			}
		}
	}
	if r.data.has("user_claim") {
		if role.userClaim, err = r.data.str("user_claim"); err != nil {
			return nil, err
		}
	}
	if r.data.has("bound_subject") {
		if role.boundSubject, err = r.data.str("bound_subject"); err != nil {
			return nil, err
		}
	}
	if r.data.has("bound_claims") {
		if role.boundClaims, err = r.data.object("bound_claims"); err != nil {
			return nil, err
		}
	}
	if r.data.has("claim_mappings") {
		if role.claimMappings, err = r.data.stringMap("claim_mappings"); err != nil {
			return nil, err
		}
	}
	leeways := []struct {
		name string
		dst  *time.Duration
	}{{"expiration_leeway", &role.expirationLeeway}, {"not_before_leeway", &role.notBeforeLeeway}, {"clock_skew_leeway", &role.clockSkewLeeway}}
	for _, f := range leeways {
		if r.data.has(f.name) {
			if *f.dst, err = r.data.duration(f.name); err != nil {
				return nil, err
			}
		}
	}
	if err := role.token.parse(r.data); err != nil {
		return nil, err
	}
	if role.userClaim == "" {
		return nil, badRequest("a user claim must be defined on the role")
	}
	if role.roleType == "oidc" && len(role.allowedRedirectURIs) == 0 {
		return nil, badRequest("'allowed_redirect_uris' must be set if 'role_type' is 'oidc' or unspecified.")
	}
	if role.roleType == "jwt" && len(role.boundAudiences) == 0 && len(role.boundClaims) == 0 && role.boundSubject == "" {
		return nil, badRequest("must have at least one bound constraint when creating/updating a role")
	}
	j.mu.Lock()
	j.roles[name] = role
	j.mu.Unlock()
	return nil, nil
}

func (j *jwtAuth) deleteRole(r *request) (*response, error) {
	j.mu.Lock()
	delete(j.roles, strings.ToLower(r.vars["name"]))
	j.mu.Unlock()
	return nil, nil
}

// leeway is the plugin's reading of a leeway setting: 0 means the
// default, a negative value none.
func leeway(set, def time.Duration) time.Duration {
	switch {
	case set < 0:
		return 0
	case set == 0:
		return def
	}
	return set
}

// login is the jwt plugin's pathLogin for static keys.
func (j *jwtAuth) login(r *request) (*response, error) {
	j.mu.Lock()
	cfg := j.config
	j.mu.Unlock()
	if cfg == nil {
		return nil, badRequest("could not load configuration")
	}
	roleName, err := r.data.str("role")
	if err != nil {
		return nil, err
	}
	roleName = strings.ToLower(roleName)
	if roleName == "" {
		roleName = cfg.defaultRole
	}
	if roleName == "" {
		return nil, badRequest("missing role")
	}
	j.mu.Lock()
	role := j.roles[roleName]
	j.mu.Unlock()
	if role == nil {
		return nil, badRequest("role %q could not be found", roleName)
	}
	if role.roleType == "oidc" {
		return nil, badRequest("role with oidc role_type is not allowed")
	}
	raw, err := r.data.str("jwt")
	if err != nil {
		return nil, err
	}
	if raw == "" {
		return nil, badRequest("missing token")
	}

	claims, all, parseErr, sigErr := verifySigned(raw, cfg.algs, cfg.pubKeys)
	if parseErr != nil {
		return nil, badRequest("error parsing token: %s", parseErr)
	}
	if sigErr != nil {
		return nil, badRequest("%s", sigErr)
	}
	// Like the plugin: require one of iat, nbf, exp, and derive the
	// missing ones with leeway.
	zero := josejwt.NumericDate(0)
	if claims.IssuedAt == nil {
		claims.IssuedAt = &zero
	}
	if claims.Expiry == nil {
		e := josejwt.NumericDate(0)
		claims.Expiry = &e
	}
	if claims.NotBefore == nil {
		n := josejwt.NumericDate(0)
		claims.NotBefore = &n
	}
	if *claims.IssuedAt == 0 && *claims.Expiry == 0 && *claims.NotBefore == 0 {
		return nil, badRequest("no issue time, notbefore, or expiration time encoded in token")
	}
	if *claims.Expiry == 0 {
		latest := max(*claims.IssuedAt, *claims.NotBefore)
		*claims.Expiry = latest + josejwt.NumericDate(seconds(leeway(role.expirationLeeway, claimDefaultLeeway)))
	}
	if *claims.NotBefore == 0 {
		if *claims.IssuedAt != 0 {
			*claims.NotBefore = *claims.IssuedAt
		} else {
			*claims.NotBefore = *claims.Expiry - josejwt.NumericDate(seconds(leeway(role.notBeforeLeeway, claimDefaultLeeway)))
		}
	}
	if len(claims.Audience) > 0 && len(role.boundAudiences) == 0 {
		return nil, badRequest("audience claim found in JWT but no audiences bound to the role")
	}
	expected := josejwt.Expected{Issuer: cfg.boundIssuer, Subject: role.boundSubject, Time: time.Now()}
	if err := claims.ValidateWithLeeway(expected, leeway(role.clockSkewLeeway, josejwt.DefaultLeeway)); err != nil {
		return nil, badRequest("error validating claims: %s", err)
	}
	if err := validateAudience(role.boundAudiences, claims.Audience); err != nil {
		return nil, badRequest("error validating claims: %s", err)
	}
	if err := validateBoundClaims(role.boundClaims, all); err != nil {
		return nil, badRequest("error validating claims: %s", err)
	}

	userRaw, ok := all[role.userClaim]
	if !ok {
		return nil, badRequest("claim %q not found in token", role.userClaim)
	}
	user, ok := userRaw.(string)
	if !ok {
		return nil, badRequest("claim %q could not be converted to string", role.userClaim)
	}
	metadata := map[string]string{"role": roleName}
	for claim, key := range role.claimMappings {
		if v, ok := all[claim]; ok {
			switch v.(type) {
			case string, float64, bool, json.Number:
				metadata[key] = fmt.Sprint(v)
			default:
				return nil, badRequest("error converting claim '%s' to string", claim)
			}
		}
	}
	l := &loginSpec{displayName: user, metadata: metadata, internal: map[string]any{"role": roleName}}
	role.token.login(l)
	return &response{login: l}, nil
}

// validateAudience is the plugin's strict audience check.
func validateAudience(bound, aud []string) error {
	if len(bound) == 0 {
		return nil
	}
	for _, b := range bound {
		if contains(aud, b) {
			return nil
		}
	}
	return errors.New("aud claim does not match any bound audience")
}

// validateBoundClaims checks bound_claims with the "string" type: each
// claim must equal the bound value or one of a bound list.
func validateBoundClaims(bound map[string]any, all map[string]any) error {
	for name, want := range bound {
		got, ok := all[name]
		if !ok {
			return fmt.Errorf("claim %q is missing", name)
		}
		var wants []string
		switch w := want.(type) {
		case []any:
			for _, e := range w {
				wants = append(wants, fmt.Sprint(e))
			}
		case string:
			for _, e := range strings.Split(w, ",") {
				wants = append(wants, strings.TrimSpace(e))
			}
		default:
			wants = []string{fmt.Sprint(w)}
		}
		var gots []string
		switch g := got.(type) {
		case []any:
			for _, e := range g {
				gots = append(gots, fmt.Sprint(e))
			}
		default:
			gots = []string{fmt.Sprint(g)}
		}
		match := false
		for _, g := range gots {
			match = match || contains(wants, g)
		}
		if !match {
			return fmt.Errorf("claim %q does not match any associated bound claim values", name)
		}
	}
	return nil
}

// renewAuth is the jwt plugin's pathLoginRenew.
func (j *jwtAuth) renewAuth(t *token) (time.Duration, time.Duration, time.Duration, error) {
	name, _ := t.internal["role"].(string)
	j.mu.Lock()
	defer j.mu.Unlock()
	role := j.roles[name]
	if role == nil {
		return 0, 0, 0, fmt.Errorf("role %s does not exist during renewal", name)
	}
	return role.token.ttl, role.token.maxTTL, role.token.period, nil
}

// kubernetesAuth is the Kubernetes auth method. Without a Kubernetes API to
// call TokenReview on, a token counts as reviewed when its signature
// verifies against the config's pem_keys and its claims pass the role.
type kubernetesAuth struct {
	mu     sync.Mutex
	config *k8sConfig
	roles  map[string]*k8sRole
}

type k8sConfig struct {
	host                 string
	caCert               string
	pemKeys              []string
	keys                 []crypto.PublicKey
	issuer               string
	disableISSValidation bool
	tokenReviewerJWT     string
}

type k8sRole struct {
	names, namespaces []string
	audience          string
	aliasNameSource   string
	token             tokenParams
}

const defaultK8sIssuer = "kubernetes/serviceaccount"

func newKubernetesAuth() *kubernetesAuth { return &kubernetesAuth{roles: map[string]*k8sRole{}} }

func (k *kubernetesAuth) routes() []*route {
	role := newRoute(`role/`+nameRegex("name"), map[op]handler{opRead: k.readRole, opUpdate: k.writeRole, opDelete: k.deleteRole})
	role.exists = func(r *request) bool {
		k.mu.Lock()
		defer k.mu.Unlock()
		return k.roles[r.vars["name"]] != nil
	}
	login := newRoute(`login`, map[op]handler{opUpdate: k.login})
	login.unauth = true
	return []*route{
		newRoute(`config`, map[op]handler{opRead: k.readConfig, opUpdate: k.writeConfig}),
		newRoute(`role/?`, map[op]handler{opList: k.listRoles}),
		role,
		login,
	}
}

func (k *kubernetesAuth) readConfig(r *request) (*response, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.config
	if c == nil {
		return nil, nil
	}
	return &response{data: map[string]any{
		"kubernetes_host":        c.host,
		"kubernetes_ca_cert":     c.caCert,
		"pem_keys":               nonNil(c.pemKeys),
		"issuer":                 c.issuer,
		"disable_iss_validation": c.disableISSValidation,
		"disable_local_ca_jwt":   false,
		"token_reviewer_jwt_set": c.tokenReviewerJWT != "",
	}}, nil
}

func (k *kubernetesAuth) writeConfig(r *request) (*response, error) {
	c := &k8sConfig{}
	var err error
	if c.host, err = r.data.str("kubernetes_host"); err != nil {
		return nil, err
	}
	if c.host == "" {
		return nil, badRequest("no host provided")
	}
	if c.caCert, err = r.data.str("kubernetes_ca_cert"); err != nil {
		return nil, err
	}
	if c.tokenReviewerJWT, err = r.data.str("token_reviewer_jwt"); err != nil {
		return nil, err
	}
	if c.issuer, err = r.data.str("issuer"); err != nil {
		return nil, err
	}
	if c.disableISSValidation, err = r.data.boolean("disable_iss_validation", true); err != nil {
		return nil, err
	}
	if c.pemKeys, err = r.data.commaStrings("pem_keys"); err != nil {
		return nil, err
	}
	for _, p := range c.pemKeys {
		key, err := parsePublicKeyPEM(p)
		if err != nil {
			return nil, badRequest("%s", err)
		}
		c.keys = append(c.keys, key)
	}
	k.mu.Lock()
	k.config = c
	k.mu.Unlock()
	return nil, nil
}

func (k *kubernetesAuth) listRoles(r *request) (*response, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return listResponse(sortedKeys(k.roles)), nil
}

func (k *kubernetesAuth) readRole(r *request) (*response, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	role := k.roles[r.vars["name"]]
	if role == nil {
		return nil, nil
	}
	data := map[string]any{
		"bound_service_account_names":      role.names,
		"bound_service_account_namespaces": role.namespaces,
		"audience":                         role.audience,
		"alias_name_source":                role.aliasNameSource,
	}
	role.token.render(data)
	return &response{data: data}, nil
}

func (k *kubernetesAuth) writeRole(r *request) (*response, error) {
	name := r.vars["name"]
	k.mu.Lock()
	old := k.roles[name]
	k.mu.Unlock()
	role := &k8sRole{aliasNameSource: "serviceaccount_uid"}
	if old != nil {
		cp := *old
		role = &cp
	}
	var err error
	if r.data.has("bound_service_account_names") {
		if role.names, err = r.data.commaStrings("bound_service_account_names"); err != nil {
			return nil, err
		}
	}
	if r.data.has("bound_service_account_namespaces") {
		if role.namespaces, err = r.data.commaStrings("bound_service_account_namespaces"); err != nil {
			return nil, err
		}
	}
	if r.data.has("audience") {
		if role.audience, err = r.data.str("audience"); err != nil {
			return nil, err
		}
	}
	if r.data.has("alias_name_source") {
		if role.aliasNameSource, err = r.data.str("alias_name_source"); err != nil {
			return nil, err
		}
	}
	if err := role.token.parse(r.data); err != nil {
		return nil, err
	}
	if len(role.names) == 0 {
		return nil, badRequest("%q can not be empty", "bound_service_account_names")
	}
	if len(role.namespaces) == 0 {
		return nil, badRequest("%q can not be empty", "bound_service_account_namespaces")
	}
	if len(role.names) > 1 && contains(role.names, "*") {
		return nil, badRequest("can not mix %q with values", "*")
	}
	if len(role.namespaces) > 1 && contains(role.namespaces, "*") {
		return nil, badRequest("can not mix %q with values", "*")
	}
	k.mu.Lock()
	k.roles[name] = role
	k.mu.Unlock()
	return nil, nil
}

func (k *kubernetesAuth) deleteRole(r *request) (*response, error) {
	k.mu.Lock()
	delete(k.roles, r.vars["name"])
	k.mu.Unlock()
	return nil, nil
}

// serviceAccount reads a service account from legacy or projected token
// claims, as the plugin's serviceAccount type does.
type serviceAccount struct{ name, uid, namespace, secretName string }

func saFromClaims(all map[string]any) serviceAccount {
	str := func(m map[string]any, key string) string { s, _ := m[key].(string); return s }
	sa := serviceAccount{
		name:       str(all, "kubernetes.io/serviceaccount/service-account.name"),
		uid:        str(all, "kubernetes.io/serviceaccount/service-account.uid"),
		namespace:  str(all, "kubernetes.io/serviceaccount/namespace"),
		secretName: str(all, "kubernetes.io/serviceaccount/secret.name"),
	}
	if proj, ok := all["kubernetes.io"].(map[string]any); ok {
		sa.namespace = str(proj, "namespace")
		if ref, ok := proj["serviceaccount"].(map[string]any); ok {
			sa.name, sa.uid = str(ref, "name"), str(ref, "uid")
		}
	}
	return sa
}

func globAny(patterns []string, s string) bool {
	for _, p := range patterns {
		if globMatch(p, s) {
			return true
		}
	}
	return false
}

// login is the kubernetes plugin's pathLogin, with signature verification
// against pem_keys standing in for the TokenReview call.
func (k *kubernetesAuth) login(r *request) (*response, error) {
	roleName, err := r.data.str("role")
	if err != nil {
		return nil, err
	}
	if roleName == "" {
		return nil, badRequest("missing role")
	}
	raw, err := r.data.str("jwt")
	if err != nil {
		return nil, err
	}
	if raw == "" {
		return nil, badRequest("missing jwt")
	}
	k.mu.Lock()
	role, cfg := k.roles[roleName], k.config
	k.mu.Unlock()
	if role == nil {
		return nil, badRequest("invalid role name %q", roleName)
	}
	if cfg == nil {
		return nil, errors.New("could not load backend configuration")
	}
	if len(cfg.keys) == 0 {
		return k.loginReviewed(r, cfg, role, roleName, raw)
	}
	claims, all, parseErr, sigErr := verifySigned(raw, allSigningAlgs[:9], cfg.keys)
	if parseErr != nil {
		return nil, coded(http.StatusForbidden, "%s", parseErr)
	}
	if sigErr != nil {
		return nil, errPermissionDenied
	}
	expected := josejwt.Expected{Time: time.Now()}
	if !cfg.disableISSValidation {
		expected.Issuer = cfg.issuer
		if expected.Issuer == "" {
			expected.Issuer = defaultK8sIssuer
		}
	}
	if err := claims.ValidateWithLeeway(expected, josejwt.DefaultLeeway); err != nil {
		return nil, coded(http.StatusForbidden, "%s", err)
	}
	if strings.TrimSpace(role.audience) != "" && !contains(claims.Audience, role.audience) {
		return nil, coded(http.StatusForbidden, "invalid audience (aud) claim: audience claim does not match any expected audience")
	}
	sa := saFromClaims(all)
	if !(len(role.names) == 1 && role.names[0] == "*") && !globAny(role.names, sa.name) {
		return nil, coded(http.StatusForbidden, "service account name not authorized")
	}
	if !(role.namespaces[0] == "*" || globAny(role.namespaces, sa.namespace)) {
		return nil, coded(http.StatusForbidden, "namespace not authorized")
	}
	if sa.uid == "" {
		return nil, errors.New("could not parse UID from claims")
	}
	metadata := map[string]string{
		"service_account_uid":         sa.uid,
		"service_account_name":        sa.name,
		"service_account_namespace":   sa.namespace,
		"service_account_secret_name": sa.secretName,
		"role":                        roleName,
	}
	l := &loginSpec{displayName: sa.namespace + "-" + sa.name, metadata: metadata, internal: map[string]any{"role": roleName}}
	role.token.login(l)
	return &response{login: l}, nil
}

// loginReviewed is login with a TokenReview against kubernetes_host (no
// pem_keys): the plugin's default.
func (k *kubernetesAuth) loginReviewed(r *request, cfg *k8sConfig, role *k8sRole, roleName, raw string) (*response, error) {
	all, err := unverifiedClaims(raw)
	if err != nil {
		return nil, coded(http.StatusForbidden, "%s", err)
	}
	claimed := saFromClaims(all)
	// The role's bounds are checked first on the claims, as the plugin
	// does, then the review decides.
	if !(len(role.names) == 1 && role.names[0] == "*") && !globAny(role.names, claimed.name) {
		return nil, coded(http.StatusForbidden, "service account name not authorized")
	}
	if !(role.namespaces[0] == "*" || globAny(role.namespaces, claimed.namespace)) {
		return nil, coded(http.StatusForbidden, "namespace not authorized")
	}
	rv, err := cfg.review(r.ctx, raw, strings.TrimSpace(role.audience))
	if err != nil {
		return nil, coded(http.StatusForbidden, "%s", err)
	}
	if rv.namespace != claimed.namespace || rv.name != claimed.name || (claimed.uid != "" && rv.uid != claimed.uid) {
		return nil, coded(http.StatusForbidden, "lookup failed: service account name, namespace or uid did not match")
	}
	metadata := map[string]string{
		"service_account_uid":       rv.uid,
		"service_account_name":      rv.name,
		"service_account_namespace": rv.namespace,
		"role":                      roleName,
	}
	if rv.podName != "" {
		metadata["service_account_pod_name"] = rv.podName
		metadata["service_account_pod_uid"] = rv.podUID
	}
	l := &loginSpec{displayName: rv.namespace + "-" + rv.name, metadata: metadata, internal: map[string]any{"role": roleName}}
	role.token.login(l)
	return &response{login: l}, nil
}

// renewAuth is the kubernetes plugin's pathLoginRenew.
func (k *kubernetesAuth) renewAuth(t *token) (time.Duration, time.Duration, time.Duration, error) {
	name, _ := t.internal["role"].(string)
	k.mu.Lock()
	defer k.mu.Unlock()
	role := k.roles[name]
	if role == nil {
		return 0, 0, 0, fmt.Errorf("role %s does not exist during renewal", name)
	}
	return role.token.ttl, role.token.maxTTL, role.token.period, nil
}
