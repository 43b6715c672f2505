package vaulttest

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

// auditLines reads a file audit log.
func auditLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("audit line is not JSON: %v\n%s", err, sc.Bytes())
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestAuditFile(t *testing.T) {
	srv, client := start(t, Options{})
	path := filepath.Join(t.TempDir(), "audit.log")
	if err := client.Sys().EnableAuditWithOptions("file", &vault.EnableAuditOptions{Type: "file", Options: map[string]string{"file_path": path}}); err != nil {
		t.Fatal(err)
	}
	err := client.Sys().EnableAuditWithOptions("file", &vault.EnableAuditOptions{Type: "file", Options: map[string]string{"file_path": path}})
	wantAPIError(t, err, 400, "path already in use")

	mustWrite(t, client, "secret/data/app", map[string]any{"data": map[string]any{"password": "s3cr3t-value", "port": 5432}})
	mustRead(t, client, "secret/data/app")
	_, _ = clientWithToken(t, client, "hvs.bogus").Logical().Read("secret/data/app")

	content, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"s3cr3t-value", srv.RootToken(), "hvs.bogus"} {
		if strings.Contains(string(content), secret) {
			t.Errorf("audit log contains %q in clear", secret)
		}
	}
	hash, err := client.Sys().AuditHash("file", "s3cr3t-value")
	if err != nil {
		t.Fatal(err)
	}
	rootHash, _ := client.Sys().AuditHash("file", srv.RootToken())

	var sawWrite, sawRead, sawDenied bool
	for _, e := range auditLines(t, path) {
		req, _ := e["request"].(map[string]any)
		if req["path"] != "secret/data/app" {
			continue
		}
		if req["namespace"].(map[string]any)["id"] != "root" || req["mount_type"] != "kv" || req["remote_address"] != "127.0.0.1" {
			t.Errorf("request = %v", req)
		}
		switch {
		case e["type"] == "request" && req["operation"] == "create":
			sawWrite = true
			data := req["data"].(map[string]any)["data"].(map[string]any)
			if data["password"] != hash || data["port"] != float64(5432) || req["client_token"] != rootHash {
				t.Errorf("write entry = %v", e)
			}
		case e["type"] == "response" && req["operation"] == "read":
			resp := e["response"].(map[string]any)
			got := resp["data"].(map[string]any)["data"].(map[string]any)["password"]
			sawRead = got == hash
			if auth := e["auth"].(map[string]any); auth["display_name"] != "root" || auth["client_token"] != rootHash {
				t.Errorf("auth = %v", auth)
			}
		case e["type"] == "request" && e["error"] != nil:
			sawDenied = strings.Contains(e["error"].(string), "invalid token")
		}
	}
	if !sawWrite || !sawRead || !sawDenied {
		t.Errorf("write %v, read %v, denial %v logged", sawWrite, sawRead, sawDenied)
	}

	if err := client.Sys().DisableAudit("file"); err != nil {
		t.Fatal(err)
	}
	before := len(auditLines(t, path))
	mustRead(t, client, "secret/data/app")
	if after := len(auditLines(t, path)); after != before {
		t.Errorf("disabled device wrote %d lines", after-before)
	}
}
