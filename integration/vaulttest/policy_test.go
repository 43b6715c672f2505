package vaulttest

import (
	"net/http"
	"slices"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

func TestPolicyMatching(t *testing.T) {
	p, err := parsePolicy("p", `
path "secret/data/app/*"   { capabilities = ["read", "list"] }
path "secret/data/app/private" { capabilities = ["deny"] }
path "secret/data/+/shared" { capabilities = ["read", "update"] }
path "secret/data/+/shared*" { capabilities = ["read", "create"] }
path "/database/creds/app" { capabilities = ["read"] }
path "database/creds/app*" { policy = "write" }
path "sys/leases/revoke-prefix/*" { capabilities = ["update", "sudo"] }
`)
	if err != nil {
		t.Fatal(err)
	}
	a := newACL([]*policy{p})
	tests := []struct {
		path string
		op   op
		sudo bool
		want bool
	}{
		{"secret/data/app/x", opRead, false, true},
		{"secret/data/app/x", opUpdate, false, false},
		{"secret/data/app/private", opRead, false, false},   // exact deny beats the glob
		{"secret/data/team/shared", opUpdate, false, true},  // no trailing * beats a glob
		{"secret/data/team/shared", opCreate, false, false}, // ... entirely, not merged
		{"secret/data/team/shared2", opCreate, false, true},
		{"secret/data/a/b/shared", opRead, false, false}, // + is one segment
		{"database/creds/app", opRead, false, true},      // leading slash stripped
		{"database/creds/app", opDelete, false, false},   // exact rule wins over the glob
		{"database/creds/app2", opDelete, false, true},   // legacy write policy
		{"sys/leases/revoke-prefix/database", opUpdate, true, true},
		{"sys/leases/revoke-prefix/database", opUpdate, false, true},
		{"other", opRead, false, false},
	}
	for _, tt := range tests {
		if got := a.allows(tt.path, tt.op, tt.sudo); got != tt.want {
			t.Errorf("allows(%q, %s, sudo=%v) = %v, want %v", tt.path, tt.op, tt.sudo, got, tt.want)
		}
	}

	// Rules for one path merge across policies; a deny wins.
	p2, _ := parsePolicy("p2", `path "secret/data/app/*" { capabilities = ["update"] }`)
	if m := newACL([]*policy{p, p2}); !m.allows("secret/data/app/x", opUpdate, false) || !m.allows("secret/data/app/x", opRead, false) {
		t.Error("capabilities of the same path were not merged")
	}
	p3, _ := parsePolicy("p3", `path "secret/data/app/*" { capabilities = ["deny"] }`)
	if m := newACL([]*policy{p, p3}); m.allows("secret/data/app/x", opRead, false) {
		t.Error("deny did not override")
	}

	for _, bad := range []string{
		`path "x" { capabilities = ["fly"] }`,
		`path "x" { policy = "maybe" }`,
		`path "x" { capabilities = ["read"] colour = "red" }`,
		`paths "x" {}`,
		`path "x" {`,
		`path "a/+*" { capabilities = ["read"] }`,
	} {
		if _, err := parsePolicy("bad", bad); err == nil {
			t.Errorf("parsePolicy(%q) succeeded", bad)
		}
	}
	if _, err := parsePolicy("json", `{"path": {"secret/*": {"capabilities": ["read"]}}}`); err != nil {
		t.Errorf("JSON policy: %v", err)
	}
}

func TestPolicyEnforcement(t *testing.T) {
	srv, client := start(t, Options{})
	if err := client.Sys().PutPolicy("app", `
path "secret/data/app/*" { capabilities = ["read", "create", "update"] }
path "secret/metadata/app/*" { capabilities = ["list"] }
`); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, client, "secret/data/app/db", map[string]any{"data": map[string]any{"k": "v"}})
	mustWrite(t, client, "secret/data/other/db", map[string]any{"data": map[string]any{"k": "v"}})
	tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"app"}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tok.Auth.Policies, []string{"app", "default"}) {
		t.Errorf("policies = %v", tok.Auth.Policies)
	}
	app := clientWithToken(t, client, tok.Auth.ClientToken)

	mustRead(t, app, "secret/data/app/db")
	mustWrite(t, app, "secret/data/app/db", map[string]any{"data": map[string]any{"k": "w"}})
	_, err = app.Logical().Read("secret/data/other/db")
	wantAPIError(t, err, http.StatusForbidden, "1 error occurred:\n\t* permission denied\n\n")
	_, err = app.Logical().Delete("secret/data/app/db")
	wantAPIError(t, err, http.StatusForbidden, "permission denied")
	// The default policy lets a token look itself up.
	if _, err := app.Auth().Token().LookupSelf(); err != nil {
		t.Errorf("lookup-self: %v", err)
	}
	// Root-protected paths need sudo.
	err = app.Sys().EnableAuditWithOptions("file", &vault.EnableAuditOptions{Type: "file", Options: map[string]string{"file_path": "discard"}})
	wantAPIError(t, err, http.StatusForbidden, "permission denied")

	t.Run("capabilities-self", func(t *testing.T) {
		caps, err := app.Sys().CapabilitiesSelf("secret/data/app/db")
		if err != nil || !slices.Equal(caps, []string{"create", "read", "update"}) {
			t.Errorf("capabilities = %v, %v", caps, err)
		}
		caps, err = app.Sys().CapabilitiesSelf("secret/data/other")
		if err != nil || !slices.Equal(caps, []string{"deny"}) {
			t.Errorf("capabilities = %v, %v", caps, err)
		}
		caps, err = client.Sys().CapabilitiesSelf("anything")
		if err != nil || !slices.Equal(caps, []string{"root"}) {
			t.Errorf("root capabilities = %v, %v", caps, err)
		}
	})
	t.Run("create versus update", func(t *testing.T) {
		if err := client.Sys().PutPolicy("update-only", `path "secret/data/*" { capabilities = ["update"] }`); err != nil {
			t.Fatal(err)
		}
		u, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"update-only"}})
		if err != nil {
			t.Fatal(err)
		}
		uc := clientWithToken(t, client, u.Auth.ClientToken)
		mustWrite(t, uc, "secret/data/app/db", map[string]any{"data": map[string]any{"k": "x"}})
		_, err = uc.Logical().Write("secret/data/new", map[string]any{"data": map[string]any{"k": "x"}})
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
	})
	t.Run("policy changes apply at once", func(t *testing.T) {
		if err := client.Sys().PutPolicy("app", `path "secret/data/other/*" { capabilities = ["read"] }`); err != nil {
			t.Fatal(err)
		}
		mustRead(t, app, "secret/data/other/db")
		_, err := app.Logical().Read("secret/data/app/db")
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
	})
	t.Run("internal ui mounts needs access to the mount", func(t *testing.T) {
		none, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"default"}})
		if err != nil {
			t.Fatal(err)
		}
		_, err = clientWithToken(t, client, none.Auth.ClientToken).Logical().Read("sys/internal/ui/mounts/secret/data/app/db")
		wantAPIError(t, err, http.StatusForbidden, "preflight capability check returned 403")
		mustRead(t, app, "sys/internal/ui/mounts/secret/data/app/db")
	})
	t.Run("store", func(t *testing.T) {
		names, err := client.Sys().ListPolicies()
		if err != nil || !slices.Equal(names, []string{"app", "default", "root", "update-only"}) {
			t.Errorf("policies = %v, %v", names, err)
		}
		text, err := client.Sys().GetPolicy("app")
		if err != nil || text != `path "secret/data/other/*" { capabilities = ["read"] }` {
			t.Errorf("policy = %q, %v", text, err)
		}
		if text, err := client.Sys().GetPolicy("nosuch"); err != nil || text != "" {
			t.Errorf("missing policy = %q, %v", text, err)
		}
		wantAPIError(t, client.Sys().PutPolicy("bad", `path "x" { capabilities = ["fly"] }`), 400, `failed to parse policy: path "x": invalid capability "fly"`)
		wantAPIError(t, client.Sys().PutPolicy("root", `path "x" {}`), 400, `cannot update "root" policy`)
		wantAPIError(t, client.Sys().DeletePolicy("default"), 400, `cannot delete "default" policy`)
		if err := client.Sys().DeletePolicy("app"); err != nil {
			t.Fatal(err)
		}
		_, err = app.Logical().Read("secret/data/other/db")
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
	})
	_ = srv
}
