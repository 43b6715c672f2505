package vaulttest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// vault/api keeps idle keep-alive connections in its transport.
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
	)
}

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: waits for TTLs or runs PostgreSQL; skipped with -short")
	}
}

// start returns a server and a root client.
func start(t *testing.T, opts Options) (*Server, *vault.Client) {
	t.Helper()
	srv := Start(t, opts)
	return srv, srv.Client(t)
}

// clientWithToken is a copy of c using token.
func clientWithToken(t *testing.T, c *vault.Client, token string) *vault.Client {
	t.Helper()
	cc, err := c.Clone()
	if err != nil {
		t.Fatal(err)
	}
	cc.SetToken(token)
	return cc
}

// rawResponse is an HTTP answer as sent.
type rawResponse struct {
	status int
	header http.Header
	body   []byte
	json   map[string]any
}

// raw sends one HTTP request to srv, to check status codes and shapes as a
// plain HTTP client sees them.
func raw(t *testing.T, srv *Server, method, path, token string, body any) rawResponse {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, srv.URL()+"/v1/"+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := rawResponse{status: resp.StatusCode, header: resp.Header, body: b}
	if len(bytes.TrimSpace(b)) > 0 {
		if err := json.Unmarshal(b, &out.json); err != nil {
			t.Fatalf("%s %s: body is not JSON: %v\n%s", method, path, err, b)
		}
	}
	return out
}

// errorsOf returns the "errors" of an error body.
func (r rawResponse) errors(t *testing.T) []string {
	t.Helper()
	list, ok := r.json["errors"].([]any)
	if !ok {
		t.Fatalf("no errors array in %s", r.body)
	}
	out := make([]string, len(list))
	for i, e := range list {
		out[i], _ = e.(string)
	}
	return out
}

// wantStatus fails unless the response has status want.
func (r rawResponse) wantStatus(t *testing.T, want int) rawResponse {
	t.Helper()
	if r.status != want {
		t.Fatalf("status = %d, want %d; body: %s", r.status, want, r.body)
	}
	return r
}

// wantAPIError fails unless err is a vault.ResponseError with status and
// an error text containing every one of texts.
func wantAPIError(t *testing.T, err error, status int, texts ...string) {
	t.Helper()
	var re *vault.ResponseError
	if !errors.As(err, &re) {
		t.Fatalf("error = %v, want a %d response", err, status)
	}
	if re.StatusCode != status {
		t.Fatalf("status = %d, want %d (%v)", re.StatusCode, status, re.Errors)
	}
	all := strings.Join(re.Errors, "\n")
	for _, text := range texts {
		if !strings.Contains(all, text) {
			t.Fatalf("errors %q do not contain %q", re.Errors, text)
		}
	}
}

// eventually retries check until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func mustWrite(t *testing.T, c *vault.Client, path string, data map[string]any) *vault.Secret {
	t.Helper()
	s, err := c.Logical().Write(path, data)
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return s
}

func mustRead(t *testing.T, c *vault.Client, path string) *vault.Secret {
	t.Helper()
	s, err := c.Logical().Read(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if s == nil {
		t.Fatalf("read %s: nothing", path)
	}
	return s
}

func jsonInt(t *testing.T, v any) int64 {
	t.Helper()
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		if err != nil {
			t.Fatalf("%v is not an integer", v)
		}
		return i
	case float64:
		return int64(n)
	}
	t.Fatalf("%v (%T) is not a number", v, v)
	return 0
}

// fakeLeaser is a secrets engine for lease tests without a database: its
// creds/<name> secrets lease with the given TTLs ("fixed" is not
// renewable), and it records renewals and revocations.
type fakeLeaser struct {
	mu        sync.Mutex
	ttl, max  time.Duration
	renewals  []time.Duration
	revoked   map[string]bool
	failNext  int // revocations to fail
	failCount int
}

func (f *fakeLeaser) routes() []*route {
	return []*route{newRoute(`creds/(?P<name>.+)`, map[op]handler{opRead: func(r *request) (*response, error) {
		id := newUUID()
		return &response{
			data: map[string]any{"id": id},
			secret: &secretSpec{ttl: f.ttl, maxTTL: f.max, renewable: r.vars["name"] != "fixed",
				leaser: f, internal: map[string]any{"id": id}},
		}, nil
	}})}
}

func (f *fakeLeaser) renewSecret(_ context.Context, _ *lease, increment time.Duration) (time.Duration, time.Duration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.renewals = append(f.renewals, increment)
	return f.ttl, f.max, nil
}

func (f *fakeLeaser) revokeSecret(_ context.Context, l *lease) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failCount < f.failNext {
		f.failCount++
		return errors.New("injected failure")
	}
	if f.revoked == nil {
		f.revoked = map[string]bool{}
	}
	f.revoked[l.internal["id"].(string)] = true
	return nil
}

func (f *fakeLeaser) failures() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failCount
}

func (f *fakeLeaser) increments() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.renewals...)
}

func (f *fakeLeaser) isRevoked(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.revoked[id]
}

// mountFake mounts f at path (with trailing slash) on srv.
func mountFake(srv *Server, path string, f *fakeLeaser) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.mounts[path] = newMount(path, "fake", "lease test engine", nil, f)
}
