package credentials

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeFile writes content to a new file in a temp dir and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatalf("write %s: %v", p, err)
	}
	return p
}

// revealAll returns a credential's fields in clear, for comparison.
func revealAll(c *Credential) map[string]string {
	out := make(map[string]string, len(c.Fields))
	for k, v := range c.Fields {
		out[k] = v.Reveal()
	}
	return out
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestStatic(t *testing.T) {
	tests := []struct {
		name    string
		content string // of the password file; "" means no file field
		fields  map[string]string
		want    map[string]string
	}{
		{
			name:   "literal fields",
			fields: map[string]string{"username": "app", "password": "pw"},
			want:   map[string]string{"username": "app", "password": "pw"},
		},
		{
			name:    "file with trailing newline",
			content: "file-pw\n",
			fields:  map[string]string{"username": "app"},
			want:    map[string]string{"username": "app", "password": "file-pw"},
		},
		{
			name:    "file with CRLF",
			content: "file-pw\r\n",
			fields:  map[string]string{"username": "app"},
			want:    map[string]string{"username": "app", "password": "file-pw"},
		},
		{
			name:    "file without newline",
			content: "file-pw",
			fields:  map[string]string{"username": "app"},
			want:    map[string]string{"username": "app", "password": "file-pw"},
		},
		{
			name:    "only one trailing newline is trimmed",
			content: "file-pw\n\n",
			fields:  map[string]string{"username": "app"},
			want:    map[string]string{"username": "app", "password": "file-pw\n"},
		},
		{
			name:    "leading and inner whitespace kept",
			content: " a b\tc\n",
			fields:  map[string]string{"username": "app"},
			want:    map[string]string{"username": "app", "password": " a b\tc"},
		},
		{
			name:   "a field named _file alone is literal",
			fields: map[string]string{"_file": "x"},
			want:   map[string]string{"_file": "x"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fields := make(map[string]string, len(tc.fields)+1)
			for k, v := range tc.fields {
				fields[k] = v
			}
			if tc.content != "" {
				fields["password_file"] = writeFile(t, "pw", tc.content)
			}
			src, err := NewStatic(fields)
			if err != nil {
				t.Fatalf("NewStatic: %v", err)
			}
			cred, err := src.Fetch(context.Background())
			if err != nil {
				t.Fatalf("Fetch: %v", err)
			}
			if got := revealAll(cred); !equalMaps(got, tc.want) {
				t.Errorf("fields = %q, want %q", got, tc.want)
			}
			if cred.Lease.Leased() {
				t.Errorf("static credential is leased: %+v", cred.Lease)
			}
		})
	}
}

func TestStaticFileReadAtStart(t *testing.T) {
	p := writeFile(t, "pw", "first\n")
	src, err := NewStatic(map[string]string{"password_file": p})
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	if err := os.WriteFile(p, []byte("second\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cred, err := src.Fetch(context.Background())
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got, _ := cred.Field("password"); got.Reveal() != "first" {
		t.Errorf("password = %q, want %q (read once, at start)", got.Reveal(), "first")
	}
}

func TestStaticMissingFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.pw")
	_, err := NewStatic(map[string]string{"username": "app", "password_file": missing})
	if err == nil {
		t.Fatalf("NewStatic with a missing file: no error")
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %v does not wrap fs.ErrNotExist", err)
	}
	if !strings.Contains(err.Error(), "password_file") {
		t.Errorf("error %q does not name the field password_file", err)
	}
}

func TestEnv(t *testing.T) {
	t.Setenv("CREDPROXY_TEST_USER", "app")
	t.Setenv("CREDPROXY_TEST_PASSWORD", "env-pw")
	t.Setenv("CREDPROXY_TEST_EMPTY", "")
	src := NewEnv(map[string]string{
		"username": "CREDPROXY_TEST_USER",
		"password": "CREDPROXY_TEST_PASSWORD",
		"empty":    "CREDPROXY_TEST_EMPTY",
	})
	cred, err := src.Fetch(context.Background())
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	want := map[string]string{"username": "app", "password": "env-pw", "empty": ""}
	if got := revealAll(cred); !equalMaps(got, want) {
		t.Errorf("fields = %q, want %q", got, want)
	}

	// Read on every fetch.
	t.Setenv("CREDPROXY_TEST_PASSWORD", "rotated")
	cred, err = src.Fetch(context.Background())
	if err != nil {
		t.Fatalf("second Fetch: %v", err)
	}
	if got, _ := cred.Field("password"); got.Reveal() != "rotated" {
		t.Errorf("password after change = %q, want %q", got.Reveal(), "rotated")
	}
}

func TestEnvUnset(t *testing.T) {
	t.Setenv("CREDPROXY_TEST_USER", "app-user-value")
	const unset = "CREDPROXY_TEST_DEFINITELY_UNSET"
	if err := os.Unsetenv(unset); err != nil {
		t.Fatal(err)
	}
	src := NewEnv(map[string]string{"username": "CREDPROXY_TEST_USER", "password": unset})
	_, err := src.Fetch(context.Background())
	if err == nil {
		t.Fatalf("Fetch with an unset variable: no error")
	}
	if !strings.Contains(err.Error(), unset) {
		t.Errorf("error %q does not name the variable %s", err, unset)
	}
	if strings.Contains(err.Error(), "app-user-value") {
		t.Errorf("error %q shows a value", err)
	}
}

func TestCredentialFieldNames(t *testing.T) {
	c := &Credential{Fields: map[string]Secret{"b": NewSecret("1"), "a": NewSecret("2"), "c": NewSecret("3")}}
	got := strings.Join(c.FieldNames(), ",")
	if got != "a,b,c" {
		t.Errorf("FieldNames() = %s, want a,b,c", got)
	}
	if _, ok := c.Field("missing"); ok {
		t.Errorf("Field(missing) ok = true")
	}
}

func TestLease(t *testing.T) {
	var zero Lease
	if zero.Leased() {
		t.Errorf("zero Lease is leased")
	}
	if !zero.Expiry().IsZero() {
		t.Errorf("zero Lease expiry = %v, want zero", zero.Expiry())
	}
	if zero.IDHash() != "" {
		t.Errorf("zero Lease IDHash = %q, want empty", zero.IDHash())
	}
	l := Lease{ID: "database/creds/app/abc", TTL: time.Hour}
	if !l.Leased() {
		t.Errorf("lease with an id and a TTL is not leased")
	}
	// sha256("database/creds/app/abc"), from sha256sum.
	const want = "9ccd5c0c2df0c8e43ef7ae298b1d47f655061e5a8536c8d7b8fb6de349e60a81"
	if got := l.IDHash(); got != want {
		t.Errorf("IDHash() = %q, want %q", got, want)
	}
	l.Issued = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	if got, want := l.Expiry(), l.Issued.Add(time.Hour); !got.Equal(want) {
		t.Errorf("Expiry() = %v, want %v", got, want)
	}
}
