package vaulttest

import (
	"errors"
	"net/http"
	"strings"
	"syscall"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

func TestHealth(t *testing.T) {
	srv, client := start(t, Options{Version: "1.21.0"})
	h, err := client.Sys().Health()
	if err != nil {
		t.Fatal(err)
	}
	if !h.Initialized || h.Sealed || h.Standby || h.Version != "1.21.0" || h.ClusterName == "" {
		t.Errorf("health = %+v", h)
	}
	r := raw(t, srv, http.MethodGet, "sys/health?activecode=299", "", nil).wantStatus(t, 299)
	if r.json["sealed"] != false {
		t.Errorf("body = %s", r.body)
	}
	raw(t, srv, http.MethodHead, "sys/health", "", nil).wantStatus(t, http.StatusOK)
	st, err := client.Sys().SealStatus()
	if err != nil || st.Sealed || !st.Initialized {
		t.Errorf("seal status = %+v, %v", st, err)
	}
}

func TestEnvelopeAndErrors(t *testing.T) {
	srv, client := start(t, Options{})
	root := srv.RootToken()
	mustWrite(t, client, "secret/data/app", map[string]any{"data": map[string]any{"k": "v"}})

	t.Run("envelope", func(t *testing.T) {
		r := raw(t, srv, http.MethodGet, "secret/data/app", root, nil).wantStatus(t, http.StatusOK)
		for _, key := range []string{"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth", "mount_type"} {
			if _, ok := r.json[key]; !ok {
				t.Errorf("envelope lacks %q: %s", key, r.body)
			}
		}
		if r.json["mount_type"] != "kv" || len(r.json["request_id"].(string)) != 36 {
			t.Errorf("envelope = %s", r.body)
		}
		if r.header.Get("Content-Type") != "application/json" || r.header.Get("Cache-Control") != "no-store" {
			t.Errorf("headers = %v", r.header)
		}
	})
	tests := []struct {
		name, method, path, token string
		body                      any
		status                    int
		errors                    []string // exact; nil means the list must be empty
	}{
		{"missing read is 404 with no errors", http.MethodGet, "secret/data/nope", root, nil, 404, nil},
		{"empty list is 404", "LIST", "secret/metadata/nope/", root, nil, 404, nil},
		{"no token", http.MethodGet, "secret/data/app", "", nil, 403, []string{"permission denied"}},
		{"unknown token", http.MethodGet, "secret/data/app", "hvs.nope", nil, 403,
			[]string{"2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"}},
		{"no handler", http.MethodGet, "nomount/x", root, nil, 404,
			[]string{`no handler for route "nomount/x". route entry not found.`}},
		{"unsupported path", http.MethodGet, "auth/token/nosuch", root, nil, 404, []string{"unsupported path"}},
		{"unsupported operation", http.MethodDelete, "auth/token/lookup-self", root, nil, 405, []string{"unsupported operation"}},
		{"bad method", http.MethodPatch, "secret/data/app", root, nil, 405, nil},
		{"bad request", http.MethodPost, "sys/mounts/x", root, map[string]any{}, 400, []string{"backend type must be specified as a string"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := raw(t, srv, tt.method, tt.path, tt.token, tt.body).wantStatus(t, tt.status)
			got := r.errors(t)
			if len(got) != len(tt.errors) {
				t.Fatalf("errors = %q, want %q", got, tt.errors)
			}
			for i := range got {
				if got[i] != tt.errors[i] {
					t.Errorf("errors[%d] = %q, want %q", i, got[i], tt.errors[i])
				}
			}
		})
	}
	t.Run("write without response is 204", func(t *testing.T) {
		raw(t, srv, http.MethodPut, "sys/policies/acl/p", root, map[string]any{"policy": `path "x" { capabilities = ["read"] }`}).
			wantStatus(t, http.StatusNoContent)
		raw(t, srv, http.MethodPost, "sys/policies/acl/p", root, map[string]any{"policy": `path "y" { capabilities = ["read"] }`}).
			wantStatus(t, http.StatusNoContent)
	})
	t.Run("list by method and query", func(t *testing.T) {
		for _, r := range []rawResponse{
			raw(t, srv, "LIST", "secret/metadata/", root, nil),
			raw(t, srv, http.MethodGet, "secret/metadata/?list=true", root, nil),
		} {
			r.wantStatus(t, http.StatusOK)
			keys := r.json["data"].(map[string]any)["keys"].([]any)
			if len(keys) != 1 || keys[0] != "app" {
				t.Errorf("keys = %v", keys)
			}
		}
	})
	t.Run("sys injects data at the top level", func(t *testing.T) {
		r := raw(t, srv, http.MethodGet, "sys/mounts", root, nil).wantStatus(t, http.StatusOK)
		if _, ok := r.json["secret/"]; !ok {
			t.Errorf("sys/mounts top level lacks secret/: %s", r.body)
		}
		r = raw(t, srv, "LIST", "sys/policies/acl", root, nil).wantStatus(t, http.StatusOK)
		if _, ok := r.json["keys"]; ok {
			t.Errorf("sys/policies/acl is not an injected route: %s", r.body)
		}
	})
	t.Run("response wrapping refused", func(t *testing.T) {
		c := clientWithToken(t, client, root)
		c.SetWrappingLookupFunc(func(string, string) string { return "1m" })
		_, err := c.Logical().Read("secret/data/app")
		wantAPIError(t, err, 400, "response wrapping is not supported")
	})
	t.Run("namespace header accepted", func(t *testing.T) {
		c := clientWithToken(t, client, root)
		c.SetNamespace("root")
		if _, err := c.Auth().Token().LookupSelf(); err != nil {
			t.Fatal(err)
		}
	})
}

func TestMounts(t *testing.T) {
	srv, client := start(t, Options{})
	if err := client.Sys().Mount("kv1", &vault.MountInput{Type: "kv", Options: map[string]string{"version": "1"}}); err != nil {
		t.Fatal(err)
	}
	if err := client.Sys().Mount("kv2", &vault.MountInput{Type: "kv-v2"}); err != nil {
		t.Fatal(err)
	}
	if err := client.Sys().Mount("database", &vault.MountInput{Type: "database"}); err != nil {
		t.Fatal(err)
	}
	mounts, err := client.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{"secret/": "2", "kv1/": "1", "kv2/": "2"} {
		m := mounts[path]
		if m == nil || m.Type != "kv" || m.Options["version"] != want {
			t.Errorf("mount %s = %+v, want kv version %s", path, m, want)
		}
	}
	if mounts["database/"] == nil || mounts["database/"].Type != "database" || mounts["sys/"] == nil {
		t.Errorf("mounts = %v", mounts)
	}

	err = client.Sys().Mount("secret", &vault.MountInput{Type: "kv"})
	wantAPIError(t, err, 400, "path is already in use at secret/")
	err = client.Sys().Mount("nope", &vault.MountInput{Type: "nosuch"})
	wantAPIError(t, err, 400, "plugin not found in the catalog: nosuch")
	err = client.Sys().Mount("sys/x", &vault.MountInput{Type: "kv"})
	wantAPIError(t, err, 403, `cannot mount "sys/x/"`)

	t.Run("internal ui mounts", func(t *testing.T) {
		for path, want := range map[string]string{"kv2/app/config": "2", "kv1/app": "1", "secret/data/x": "2"} {
			s := mustRead(t, client, "sys/internal/ui/mounts/"+path)
			mount := strings.SplitN(path, "/", 2)[0] + "/"
			opts, _ := s.Data["options"].(map[string]any)
			if s.Data["type"] != "kv" || s.Data["path"] != mount || opts["version"] != want {
				t.Errorf("%s: data = %v", path, s.Data)
			}
		}
		_, err := client.Logical().Read("sys/internal/ui/mounts/nomount/x")
		wantAPIError(t, err, 403, "preflight capability check returned 403")
		raw(t, srv, http.MethodGet, "sys/internal/ui/mounts/kv1/app", "", nil).wantStatus(t, 403)
	})

	t.Run("unmount", func(t *testing.T) {
		if err := client.Sys().Unmount("kv1"); err != nil {
			t.Fatal(err)
		}
		r := raw(t, srv, http.MethodGet, "kv1/x", srv.RootToken(), nil).wantStatus(t, 404)
		if e := r.errors(t); len(e) != 1 || !strings.Contains(e[0], "no handler for route") {
			t.Errorf("errors = %q", e)
		}
	})
}

func TestKVv1(t *testing.T) {
	srv, client := start(t, Options{DefaultLeaseTTL: 3600e9 * 24, MaxLeaseTTL: 3600e9 * 48})
	if err := client.Sys().Mount("kv", &vault.MountInput{Type: "kv", Options: map[string]string{"version": "1"}}); err != nil {
		t.Fatal(err)
	}
	if s := mustWrite(t, client, "kv/app/db", map[string]any{"username": "u", "password": "p"}); s != nil {
		t.Errorf("write returned %+v", s)
	}
	mustWrite(t, client, "kv/app/other", map[string]any{"x": "y"})
	mustWrite(t, client, "kv/top", map[string]any{"x": "y"})

	r := raw(t, srv, http.MethodGet, "kv/app/db", srv.RootToken(), nil).wantStatus(t, http.StatusOK)
	data := r.json["data"].(map[string]any)
	if data["username"] != "u" || data["password"] != "p" {
		t.Errorf("data = %v", data)
	}
	// KV reads report the mount's default TTL without a lease.
	if r.json["lease_id"] != "" || r.json["renewable"] != false || r.json["lease_duration"] != float64(24*3600) {
		t.Errorf("lease fields = %s", r.body)
	}
	list, err := client.Logical().List("kv/")
	if err != nil {
		t.Fatal(err)
	}
	if got := list.Data["keys"]; len(got.([]any)) != 2 || got.([]any)[0] != "app/" || got.([]any)[1] != "top" {
		t.Errorf("keys = %v", got)
	}
	kv := client.KVv1("kv")
	got, err := kv.Get(t.Context(), "app/other")
	if err != nil || got.Data["x"] != "y" {
		t.Fatalf("KVv1 get = %v, %v", got, err)
	}
	if _, err := client.Logical().Delete("kv/app/db"); err != nil {
		t.Fatal(err)
	}
	if s, err := client.Logical().Read("kv/app/db"); err != nil || s != nil {
		t.Errorf("after delete: %v, %v", s, err)
	}
	_, err = client.Logical().Write("kv/empty", map[string]any{})
	wantAPIError(t, err, 400, "missing data fields")
}

func TestKVv2(t *testing.T) {
	srv, client := start(t, Options{})
	root := srv.RootToken()

	w := mustWrite(t, client, "secret/data/app", map[string]any{"data": map[string]any{"password": "one"}})
	if jsonInt(t, w.Data["version"]) != 1 || w.Data["destroyed"] != false || w.Data["created_time"] == "" || w.Data["deletion_time"] != "" {
		t.Errorf("write data = %v", w.Data)
	}
	mustWrite(t, client, "secret/data/app", map[string]any{"data": map[string]any{"password": "two"}})

	r := raw(t, srv, http.MethodGet, "secret/data/app", root, nil).wantStatus(t, 200)
	data := r.json["data"].(map[string]any)
	meta := data["metadata"].(map[string]any)
	if data["data"].(map[string]any)["password"] != "two" || meta["version"] != float64(2) || r.json["lease_duration"] != float64(0) {
		t.Errorf("read = %s", r.body)
	}
	for _, key := range []string{"created_time", "deletion_time", "destroyed", "custom_metadata"} {
		if _, ok := meta[key]; !ok {
			t.Errorf("metadata lacks %q", key)
		}
	}
	old, err := client.Logical().ReadWithData("secret/data/app", map[string][]string{"version": {"1"}})
	if err != nil || old.Data["data"].(map[string]any)["password"] != "one" {
		t.Errorf("version 1 = %v, %v", old, err)
	}

	t.Run("check-and-set", func(t *testing.T) {
		_, err := client.Logical().Write("secret/data/app", map[string]any{"data": map[string]any{"a": "b"}, "options": map[string]any{"cas": 1}})
		wantAPIError(t, err, 400, "check-and-set parameter did not match the current version")
		mustWrite(t, client, "secret/data/app", map[string]any{"data": map[string]any{"password": "three"}, "options": map[string]any{"cas": 2}})
	})
	t.Run("api helper", func(t *testing.T) {
		kv := client.KVv2("secret")
		got, err := kv.Get(t.Context(), "app")
		if err != nil || got.Data["password"] != "three" || got.VersionMetadata.Version != 3 {
			t.Fatalf("KVv2 get = %+v, %v", got, err)
		}
		if _, err := kv.Put(t.Context(), "other", map[string]any{"k": "v"}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("soft delete keeps metadata", func(t *testing.T) {
		if _, err := client.Logical().Delete("secret/data/other"); err != nil {
			t.Fatal(err)
		}
		r := raw(t, srv, http.MethodGet, "secret/data/other", root, nil).wantStatus(t, 404)
		data := r.json["data"].(map[string]any)
		if data["data"] != nil || data["metadata"].(map[string]any)["deletion_time"] == "" {
			t.Errorf("deleted read = %s", r.body)
		}
		mustWrite(t, client, "secret/undelete/other", map[string]any{"versions": []int{1}})
		mustRead(t, client, "secret/data/other")
	})
	t.Run("metadata", func(t *testing.T) {
		m := mustRead(t, client, "secret/metadata/app")
		if jsonInt(t, m.Data["current_version"]) != 3 || len(m.Data["versions"].(map[string]any)) != 3 {
			t.Errorf("metadata = %v", m.Data)
		}
		l, err := client.Logical().List("secret/metadata")
		if err != nil || len(l.Data["keys"].([]any)) != 2 {
			t.Errorf("list = %v, %v", l, err)
		}
	})
	t.Run("v1 path on a v2 mount", func(t *testing.T) {
		r := raw(t, srv, http.MethodGet, "secret/app", root, nil).wantStatus(t, 404)
		w, _ := r.json["warnings"].([]any)
		if len(w) != 1 || !strings.Contains(w[0].(string), "Invalid path for a versioned K/V secrets engine") || r.json["data"] != nil {
			t.Errorf("body = %s", r.body)
		}
	})
	t.Run("no data", func(t *testing.T) {
		_, err := client.Logical().Write("secret/data/x", map[string]any{"foo": "bar"})
		wantAPIError(t, err, 400, "no data provided")
	})
}

func TestStopRestart(t *testing.T) {
	srv, client := start(t, Options{})
	addr := srv.Addr()
	mustWrite(t, client, "secret/data/keep", map[string]any{"data": map[string]any{"v": "1"}})
	tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}

	srv.Stop()
	_, err = client.Logical().Read("secret/data/keep")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("read while stopped: %v, want connection refused", err)
	}
	srv.Stop() // no-op

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if srv.Addr() != addr {
		t.Fatalf("address changed: %s -> %s", addr, srv.Addr())
	}
	if s := mustRead(t, client, "secret/data/keep"); s.Data["data"].(map[string]any)["v"] != "1" {
		t.Errorf("data after restart = %v", s.Data)
	}
	if _, err := clientWithToken(t, client, tok.Auth.ClientToken).Auth().Token().LookupSelf(); err != nil {
		t.Errorf("token after restart: %v", err)
	}
	if err := srv.Restart(); err != nil { // restart while running
		t.Fatal(err)
	}
	mustRead(t, client, "secret/data/keep")
	if n := srv.Count("secret/data/keep"); n != 3 {
		t.Errorf("Count = %d, want 3 (a stopped server sees nothing)", n)
	}
	srv.Close()
	srv.Close() // idempotent
	if err := srv.Restart(); err == nil {
		t.Error("Restart after Close succeeded")
	}
}
