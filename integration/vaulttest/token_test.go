package vaulttest

import (
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

func TestRootToken(t *testing.T) {
	srv, client := start(t, Options{RootToken: "root"})
	if srv.RootToken() != "root" {
		t.Fatalf("RootToken = %q", srv.RootToken())
	}
	s, err := client.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatal(err)
	}
	if s.Data["display_name"] != "root" || s.Data["path"] != "auth/token/root" || s.Data["expire_time"] != nil ||
		jsonInt(t, s.Data["ttl"]) != 0 || s.Data["orphan"] != true {
		t.Errorf("lookup-self = %v", s.Data)
	}
	if p, _ := s.TokenPolicies(); !slices.Equal(p, []string{"root"}) {
		t.Errorf("policies = %v", p)
	}
	// The root token has no lease to renew.
	_, err = client.Auth().Token().RenewSelf(0)
	wantAPIError(t, err, http.StatusBadRequest, "invalid lease ID")

	random := Start(t, Options{})
	if !strings.HasPrefix(random.RootToken(), "hvs.") || len(random.RootToken()) != 28 {
		t.Errorf("random root token = %q", random.RootToken())
	}
}

func TestTokenCreateAndLookup(t *testing.T) {
	_, client := start(t, Options{})
	s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{
		Policies: []string{"dev"}, TTL: "1h", ExplicitMaxTTL: "2h", DisplayName: "ci job", Metadata: map[string]string{"team": "a"},
	})
	if err != nil {
		t.Fatal(err)
	}
	a := s.Auth
	if !strings.HasPrefix(a.ClientToken, "hvs.") || a.Accessor == "" || a.LeaseDuration != 3600 || !a.Renewable ||
		!slices.Equal(a.Policies, []string{"default", "dev"}) || a.Orphan || a.Metadata["team"] != "a" {
		t.Errorf("auth = %+v", a)
	}
	if len(s.Warnings) != 1 || s.Warnings[0] != `Policy "dev" does not exist` {
		t.Errorf("warnings = %q", s.Warnings)
	}
	tc := clientWithToken(t, client, a.ClientToken)
	l, err := tc.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatal(err)
	}
	ttl, _ := l.TokenTTL()
	if l.Data["display_name"] != "token-ci-job" || l.Data["path"] != "auth/token/create" || ttl < 3590*time.Second || ttl > time.Hour ||
		jsonInt(t, l.Data["explicit_max_ttl"]) != 7200 || jsonInt(t, l.Data["creation_ttl"]) != 3600 || l.Data["renewable"] != true ||
		l.Data["issue_time"] == nil || l.Data["expire_time"] == nil || l.Data["accessor"] != a.Accessor {
		t.Errorf("lookup-self = %v", l.Data)
	}
	acc, err := client.Auth().Token().LookupAccessor(a.Accessor)
	if err != nil || acc.Data["id"] != "" || acc.Data["display_name"] != "token-ci-job" {
		t.Errorf("lookup-accessor = %v, %v", acc, err)
	}

	t.Run("child policies must be a subset", func(t *testing.T) {
		_, err := tc.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"other"}})
		wantAPIError(t, err, http.StatusForbidden, "permission denied") // default policy cannot create tokens
	})
	t.Run("default ttl is the system default", func(t *testing.T) {
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"default"}})
		if err != nil || s.Auth.LeaseDuration != int((768*time.Hour).Seconds()) {
			t.Errorf("auth = %+v, %v", s.Auth, err)
		}
	})
	t.Run("a root child without ttl never expires", func(t *testing.T) {
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{})
		if err != nil || s.Auth.LeaseDuration != 0 || s.Auth.Renewable || !slices.Equal(s.Auth.Policies, []string{"root"}) {
			t.Errorf("auth = %+v, %v", s.Auth, err)
		}
	})
	t.Run("capped by the system max", func(t *testing.T) {
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "10000h"})
		if err != nil || s.Auth.LeaseDuration != int((768*time.Hour).Seconds()) || len(s.Warnings) == 0 ||
			!strings.Contains(s.Warnings[0], `TTL of "10000h" exceeded the effective max_ttl of "768h"; TTL value is capped accordingly`) {
			t.Errorf("auth = %+v, warnings %q, %v", s.Auth, s.Warnings, err)
		}
	})
	t.Run("non-renewable", func(t *testing.T) {
		no := false
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h", Renewable: &no})
		if err != nil || s.Auth.Renewable {
			t.Fatalf("auth = %+v, %v", s.Auth, err)
		}
		_, err = clientWithToken(t, client, s.Auth.ClientToken).Auth().Token().RenewSelf(60)
		wantAPIError(t, err, http.StatusBadRequest, "lease is not renewable")
	})
}

func TestTokenRenewRevokeExpire(t *testing.T) {
	skipShort(t)
	t.Parallel()
	_, client := start(t, Options{})

	t.Run("renew-self capped by explicit max", func(t *testing.T) {
		t.Parallel()
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "2s", ExplicitMaxTTL: "4s"})
		if err != nil {
			t.Fatal(err)
		}
		tc := clientWithToken(t, client, s.Auth.ClientToken)
		r, err := tc.Auth().Token().RenewSelf(3)
		if err != nil || r.Auth.LeaseDuration != 3 {
			t.Fatalf("renew = %+v, %v", r, err)
		}
		time.Sleep(1100 * time.Millisecond)
		r, err = tc.Auth().Token().RenewSelf(60)
		if err != nil {
			t.Fatal(err)
		}
		if r.Auth.LeaseDuration < 1 || r.Auth.LeaseDuration > 3 || len(r.Warnings) != 1 ||
			!strings.Contains(r.Warnings[0], `TTL of "1m" exceeded the effective max_ttl of`) {
			t.Errorf("capped renew = %+v, warnings %q", r.Auth, r.Warnings)
		}
		// Past the max TTL the token is gone: 403 with "invalid token".
		eventually(t, 6*time.Second, func() error {
			_, err := tc.Auth().Token().LookupSelf()
			if err == nil {
				return errors.New("token still valid")
			}
			return nil
		})
		_, err = tc.Auth().Token().LookupSelf()
		wantAPIError(t, err, http.StatusForbidden, "permission denied", "invalid token")
	})
	t.Run("renew with no increment uses the last ttl", func(t *testing.T) {
		t.Parallel()
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		r, err := client.Auth().Token().Renew(s.Auth.ClientToken, 0)
		if err != nil || r.Auth.LeaseDuration != 3600 {
			t.Errorf("renew = %+v, %v", r, err)
		}
	})
	t.Run("revoke-self revokes children", func(t *testing.T) {
		t.Parallel()
		parent, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		pc := clientWithToken(t, client, parent.Auth.ClientToken)
		child, err := pc.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		orphan, err := client.Auth().Token().CreateOrphan(&vault.TokenCreateRequest{TTL: "1h"})
		if err != nil || !orphan.Auth.Orphan {
			t.Fatalf("orphan = %+v, %v", orphan, err)
		}
		if err := pc.Auth().Token().RevokeSelf(""); err != nil {
			t.Fatal(err)
		}
		for _, tok := range []string{parent.Auth.ClientToken, child.Auth.ClientToken} {
			_, err := clientWithToken(t, client, tok).Auth().Token().LookupSelf()
			wantAPIError(t, err, http.StatusForbidden, "invalid token")
		}
		if _, err := clientWithToken(t, client, orphan.Auth.ClientToken).Auth().Token().LookupSelf(); err != nil {
			t.Errorf("orphan revoked too: %v", err)
		}
	})
	t.Run("num_uses", func(t *testing.T) {
		t.Parallel()
		s, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h", NumUses: 2})
		if err != nil {
			t.Fatal(err)
		}
		tc := clientWithToken(t, client, s.Auth.ClientToken)
		for i := 0; i < 2; i++ {
			if _, err := tc.Auth().Token().LookupSelf(); err != nil {
				t.Fatalf("use %d: %v", i+1, err)
			}
		}
		_, err = tc.Auth().Token().LookupSelf()
		wantAPIError(t, err, http.StatusForbidden, "invalid token")
	})
}
