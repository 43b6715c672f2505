package vaulttest

import (
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

func TestAppRole(t *testing.T) {
	srv, client := start(t, Options{})
	if err := client.Sys().EnableAuthWithOptions("approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	if m, err := client.Sys().GetAuth("approle"); err != nil || m.Type != "approle" {
		t.Fatalf("GetAuth = %+v, %v", m, err)
	}
	if auths, err := client.Sys().ListAuth(); err != nil || auths["approle/"] == nil || auths["token/"] == nil {
		t.Fatalf("ListAuth = %v, %v", auths, err)
	}
	err := client.Sys().EnableAuthWithOptions("approle", &vault.EnableAuthOptions{Type: "approle"})
	wantAPIError(t, err, http.StatusBadRequest, "path is already in use at auth/approle/")
	if err := client.Sys().PutPolicy("app", `path "secret/data/app" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, client, "auth/approle/role/credproxy", map[string]any{
		"token_policies": "app", "token_ttl": "1h", "token_max_ttl": "2h", "secret_id_num_uses": 2, "secret_id_ttl": "10m",
	})
	role := mustRead(t, client, "auth/approle/role/credproxy")
	if !slices.Equal(toStrings(role.Data["token_policies"]), []string{"app"}) || jsonInt(t, role.Data["token_ttl"]) != 3600 ||
		jsonInt(t, role.Data["token_max_ttl"]) != 7200 || jsonInt(t, role.Data["secret_id_num_uses"]) != 2 || role.Data["bind_secret_id"] != true {
		t.Errorf("role = %v", role.Data)
	}
	roleID := mustRead(t, client, "auth/approle/role/credproxy/role-id").Data["role_id"].(string)
	sid := mustWrite(t, client, "auth/approle/role/credproxy/secret-id", nil)
	secretID := sid.Data["secret_id"].(string)
	if sid.Data["secret_id_accessor"] == "" || jsonInt(t, sid.Data["secret_id_ttl"]) != 600 || jsonInt(t, sid.Data["secret_id_num_uses"]) != 2 {
		t.Errorf("secret-id = %v", sid.Data)
	}

	anon := clientWithToken(t, client, "")
	login, err := anon.Logical().Write("auth/approle/login", map[string]any{"role_id": roleID, "secret_id": secretID})
	if err != nil {
		t.Fatal(err)
	}
	a := login.Auth
	if !strings.HasPrefix(a.ClientToken, "hvs.") || a.Accessor == "" || !slices.Equal(a.Policies, []string{"app", "default"}) ||
		!slices.Equal(a.TokenPolicies, []string{"app", "default"}) || a.LeaseDuration != 3600 || !a.Renewable ||
		a.Metadata["role_name"] != "credproxy" || !a.Orphan || login.Data != nil {
		t.Errorf("login auth = %+v, data %v", a, login.Data)
	}
	tc := clientWithToken(t, client, a.ClientToken)
	self, err := tc.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatal(err)
	}
	if self.Data["display_name"] != "approle" || self.Data["path"] != "auth/approle/login" {
		t.Errorf("lookup-self = %v", self.Data)
	}
	r, err := tc.Auth().Token().RenewSelf(5 * 3600)
	if err != nil {
		t.Fatal(err)
	}
	if r.Auth.LeaseDuration > 7200 || r.Auth.LeaseDuration < 7190 || len(r.Warnings) != 1 {
		t.Errorf("renew past token_max_ttl = %d, warnings %q", r.Auth.LeaseDuration, r.Warnings)
	}

	t.Run("secret_id_num_uses", func(t *testing.T) {
		if _, err := anon.Logical().Write("auth/approle/login", map[string]any{"role_id": roleID, "secret_id": secretID}); err != nil {
			t.Fatalf("second use: %v", err)
		}
		_, err := anon.Logical().Write("auth/approle/login", map[string]any{"role_id": roleID, "secret_id": secretID})
		wantAPIError(t, err, http.StatusBadRequest, "invalid role or secret ID")
	})
	t.Run("bad credentials", func(t *testing.T) {
		_, err := anon.Logical().Write("auth/approle/login", map[string]any{"role_id": roleID, "secret_id": "nope"})
		wantAPIError(t, err, http.StatusBadRequest, "invalid role or secret ID")
		_, err = anon.Logical().Write("auth/approle/login", map[string]any{"role_id": "nope", "secret_id": secretID})
		wantAPIError(t, err, http.StatusBadRequest, "invalid role or secret ID")
		_, err = anon.Logical().Write("auth/approle/login", map[string]any{"role_id": roleID})
		wantAPIError(t, err, http.StatusBadRequest, "missing secret_id")
	})
	t.Run("custom mount path", func(t *testing.T) {
		if err := client.Sys().EnableAuthWithOptions("apps/east", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, client, "auth/apps/east/role/r", map[string]any{"token_policies": []string{"app"}})
		rid := mustRead(t, client, "auth/apps/east/role/r/role-id").Data["role_id"].(string)
		sid := mustWrite(t, client, "auth/apps/east/role/r/secret-id", nil).Data["secret_id"].(string)
		l, err := anon.Logical().Write("auth/apps/east/login", map[string]any{"role_id": rid, "secret_id": sid})
		if err != nil {
			t.Fatal(err)
		}
		self, err := clientWithToken(t, client, l.Auth.ClientToken).Auth().Token().LookupSelf()
		if err != nil || self.Data["display_name"] != "apps-east" {
			t.Errorf("lookup-self = %v, %v", self, err)
		}
	})
	t.Run("disabling the method revokes its tokens", func(t *testing.T) {
		if err := client.Sys().DisableAuth("approle"); err != nil {
			t.Fatal(err)
		}
		_, err := tc.Auth().Token().LookupSelf()
		wantAPIError(t, err, http.StatusForbidden, "invalid token")
	})
	t.Run("enable needs sudo", func(t *testing.T) {
		tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"app"}})
		if err != nil {
			t.Fatal(err)
		}
		err = clientWithToken(t, client, tok.Auth.ClientToken).Sys().EnableAuthWithOptions("x", &vault.EnableAuthOptions{Type: "approle"})
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
	})
	_ = srv
}

func toStrings(v any) []string {
	list, _ := v.([]any)
	out := make([]string, len(list))
	for i, e := range list {
		out[i], _ = e.(string)
	}
	return out
}

func TestJWTAuth(t *testing.T) {
	_, client := start(t, Options{})
	signer, other, ec := NewSigner(t), NewSigner(t), NewECSigner(t)
	if err := client.Sys().EnableAuthWithOptions("jwt", &vault.EnableAuthOptions{Type: "jwt"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, client, "auth/jwt/config", map[string]any{
		"jwt_validation_pubkeys": []string{signer.PublicKeyPEM(), ec.PublicKeyPEM()},
		"bound_issuer":           "https://issuer.example",
	})
	_, err := client.Logical().Write("auth/jwt/role/oidc-default", map[string]any{"user_claim": "sub"})
	wantAPIError(t, err, http.StatusBadRequest, "'allowed_redirect_uris' must be set")
	mustWrite(t, client, "auth/jwt/role/ci", map[string]any{
		"role_type": "jwt", "bound_audiences": "credproxy", "user_claim": "sub",
		"token_policies": []string{"ci"}, "token_ttl": "10m", "token_max_ttl": "1h",
		"claim_mappings": map[string]any{"team": "team"},
	})
	anon := clientWithToken(t, client, "")
	login := func(jwt string) (*vault.Secret, error) {
		return anon.Logical().Write("auth/jwt/login", map[string]any{"role": "ci", "jwt": jwt})
	}
	good := JWTClaims("https://issuer.example", "alice", "credproxy", 5*time.Minute)
	good["team"] = "blue"

	s, err := login(signer.Sign(t, good))
	if err != nil {
		t.Fatal(err)
	}
	if s.Auth.LeaseDuration != 600 || !slices.Equal(s.Auth.Policies, []string{"ci", "default"}) ||
		s.Auth.Metadata["role"] != "ci" || s.Auth.Metadata["team"] != "blue" {
		t.Errorf("auth = %+v", s.Auth)
	}
	self, err := clientWithToken(t, client, s.Auth.ClientToken).Auth().Token().LookupSelf()
	if err != nil || self.Data["display_name"] != "jwt-alice" {
		t.Errorf("lookup-self = %v, %v", self, err)
	}
	if _, err := login(ec.Sign(t, good)); err != nil {
		t.Errorf("ES256 login: %v", err)
	}

	expired := JWTClaims("https://issuer.example", "alice", "credproxy", -10*time.Minute)
	expired["iat"] = time.Now().Add(-20 * time.Minute).Unix()
	expired["nbf"] = expired["iat"]
	notYet := JWTClaims("https://issuer.example", "alice", "credproxy", time.Hour)
	notYet["nbf"] = time.Now().Add(10 * time.Minute).Unix()
	tests := []struct {
		name   string
		jwt    string
		errors []string
	}{
		{"wrong key", other.Sign(t, good), []string{"no known key successfully validated the token signature"}},
		{"wrong audience", signer.Sign(t, JWTClaims("https://issuer.example", "alice", "someone-else", time.Minute)),
			[]string{"error validating claims: aud claim does not match any bound audience"}},
		{"wrong issuer", signer.Sign(t, JWTClaims("https://evil.example", "alice", "credproxy", time.Minute)),
			[]string{"error validating claims:", "invalid issuer claim (iss)"}},
		{"expired", signer.Sign(t, expired), []string{"error validating claims:", "token is expired (exp)"}},
		{"not yet valid", signer.Sign(t, notYet), []string{"error validating claims:", "token not valid yet (nbf)"}},
		{"no time claims", signer.Sign(t, map[string]any{"iss": "https://issuer.example", "sub": "alice", "aud": "credproxy"}),
			[]string{"no issue time, notbefore, or expiration time encoded in token"}},
		{"not a jwt", "garbage", []string{"error parsing token"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := login(tt.jwt)
			wantAPIError(t, err, http.StatusBadRequest, tt.errors...)
		})
	}
	t.Run("unknown role", func(t *testing.T) {
		_, err := anon.Logical().Write("auth/jwt/login", map[string]any{"role": "nope", "jwt": signer.Sign(t, good)})
		wantAPIError(t, err, http.StatusBadRequest, `role "nope" could not be found`)
	})
}

func TestKubernetesAuth(t *testing.T) {
	_, client := start(t, Options{})
	signer, other := NewSigner(t), NewSigner(t)
	if err := client.Sys().EnableAuthWithOptions("k8s", &vault.EnableAuthOptions{Type: "kubernetes"}); err != nil {
		t.Fatal(err)
	}
	_, err := client.Logical().Write("auth/k8s/config", map[string]any{"pem_keys": signer.PublicKeyPEM()})
	wantAPIError(t, err, http.StatusBadRequest, "no host provided")
	mustWrite(t, client, "auth/k8s/config", map[string]any{"kubernetes_host": "https://10.0.0.1:443", "pem_keys": []string{signer.PublicKeyPEM()}})
	mustWrite(t, client, "auth/k8s/role/app", map[string]any{
		"bound_service_account_names": "credproxy", "bound_service_account_namespaces": "prod,staging",
		"token_policies": "app", "token_ttl": 600,
	})
	anon := clientWithToken(t, client, "")
	login := func(jwt string) (*vault.Secret, error) {
		return anon.Logical().Write("auth/k8s/login", map[string]any{"role": "app", "jwt": jwt})
	}
	s, err := login(signer.Sign(t, KubernetesClaims("prod", "credproxy", "vault", time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if s.Auth.LeaseDuration != 600 || s.Auth.Metadata["service_account_name"] != "credproxy" ||
		s.Auth.Metadata["service_account_namespace"] != "prod" || s.Auth.Metadata["role"] != "app" {
		t.Errorf("auth = %+v", s.Auth)
	}
	self, err := clientWithToken(t, client, s.Auth.ClientToken).Auth().Token().LookupSelf()
	if err != nil || self.Data["display_name"] != "k8s-prod-credproxy" {
		t.Errorf("lookup-self = %v, %v", self, err)
	}
	tests := []struct {
		name string
		jwt  string
		text string
	}{
		{"wrong service account", signer.Sign(t, KubernetesClaims("prod", "other", "vault", time.Hour)), "service account name not authorized"},
		{"wrong namespace", signer.Sign(t, KubernetesClaims("dev", "credproxy", "vault", time.Hour)), "namespace not authorized"},
		{"wrong key", other.Sign(t, KubernetesClaims("prod", "credproxy", "vault", time.Hour)), "permission denied"},
		{"expired", signer.Sign(t, KubernetesClaims("prod", "credproxy", "vault", -time.Hour)), "token is expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := login(tt.jwt)
			wantAPIError(t, err, http.StatusForbidden, tt.text)
		})
	}
	_, err = anon.Logical().Write("auth/k8s/login", map[string]any{"role": "nope", "jwt": "x"})
	wantAPIError(t, err, http.StatusBadRequest, `invalid role name "nope"`)
}
