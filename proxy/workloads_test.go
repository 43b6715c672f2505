package proxy_test

import (
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy"
)

// workloadServer is a DaemonSet-mode engine with static secrets and the
// peer check off (the attack tests on real cgroups are identity's and
// integration's), serving the fake upstream.
func workloadServer(t *testing.T) *proxy.Server {
	t.Helper()
	dir := t.TempDir()
	src := `
shutdown_grace: 1s
audit: {path: ` + filepath.Join(dir, "audit.jsonl") + `}
secrets:
  s: {static: {username: u, password: p}}
postgres:
  - {name: db, upstream: "` + fakeUpstream(t) + `", credentials: s, tls: {mode: disable}}
workloads:
  attribution: csi
  node_name: node-0
  peer_check: "off"
  rules:
    - match: {namespace: payments, service_account: api}
      allow: [db]
`
	cfg, err := config.Parse([]byte(src), dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.New(cfg, zap.NewNop(), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv
}

func apiWorkload(pod, uid, token string) *identity.Workload {
	return identity.NewWorkload(identity.Workload{Namespace: "payments", ServiceAccount: "api", ServiceAccountUID: "sa-1",
		Pod: pod, PodUID: uid, Node: "node-0"}, identity.NewToken(token), time.Now().Add(time.Hour))
}

// TestWorkloadLifecycle: a republish refreshes the token credproxy logs in
// with; pods of one service account share one workload key; withdrawing
// a pod ends its sessions and removes its socket at once, and the last
// pod of a key closes the key's credentials.
func TestWorkloadLifecycle(t *testing.T) {
	srv := workloadServer(t)
	dirA, dirB := t.TempDir(), t.TempDir()
	if err := srv.PublishWorkload(apiWorkload("api-0", "uid-a", "token-a1"), dirA); err != nil {
		t.Fatal(err)
	}
	if tok, err := proxy.WorkloadToken(srv, "uid-a"); err != nil || tok != "token-a1" {
		t.Fatalf("token %q, %v; want the pod's", tok, err)
	}

	// The kubelet's republish: the same pod, a fresh token.
	if err := srv.PublishWorkload(apiWorkload("api-0", "uid-a", "token-a2"), dirA); err != nil {
		t.Fatal(err)
	}
	if tok, _ := proxy.WorkloadToken(srv, "uid-a"); tok != "token-a2" {
		t.Errorf("after a republish the workload logs in with %q, want the fresh token", tok)
	}

	// A second pod of the service account shares the key.
	if err := srv.PublishWorkload(apiWorkload("api-1", "uid-b", "token-b1"), dirB); err != nil {
		t.Fatal(err)
	}
	if n := proxy.WorkloadKeys(srv); n != 1 {
		t.Errorf("%d workload keys for one service account, want 1", n)
	}

	sockA := filepath.Join(dirA, ".s.PGSQL.5432")
	c := connect(t, "unix:"+sockA)
	defer c.Close()
	if !srv.UnpublishWorkload("uid-a") {
		t.Fatal("pod A was not published")
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("pod A's session is still open after it was withdrawn: %v", err)
	}
	if _, err := os.Stat(sockA); !os.IsNotExist(err) {
		t.Errorf("pod A's socket is still there: %v", err)
	}
	// Pod A's token is never used again; pod B's is.
	if tok, _ := proxy.WorkloadToken(srv, "uid-b"); tok != "token-b1" {
		t.Errorf("with pod A gone the workload logs in with %q, want pod B's token", tok)
	}
	if n := proxy.WorkloadKeys(srv); n != 1 {
		t.Errorf("%d workload keys with pod B still there, want 1", n)
	}
	if srv.UnpublishWorkload("uid-a") {
		t.Error("pod A was withdrawn twice")
	}
	if !srv.UnpublishWorkload("uid-b") {
		t.Fatal("pod B was not published")
	}
	if n := proxy.WorkloadKeys(srv); n != 0 {
		t.Errorf("%d workload keys with no pod left, want 0 (the last pod closes its key's credentials)", n)
	}
}
