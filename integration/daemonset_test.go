package integration

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/identity/csi"
	"github.com/credproxy/credproxy/integration/kubetest"
	"github.com/credproxy/credproxy/integration/nodetest"
	"github.com/credproxy/credproxy/integration/pgtest"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/proxy/audit"
)

// DaemonSet mode end to end: a real kube-apiserver (TokenRequest,
// TokenReview, pod-bound tokens), Vault logging the workloads in with
// their own pods' tokens through a real TokenReview, a real PostgreSQL
// with Vault's dynamic roles, credproxy's CSI node plugin driven over
// its gRPC socket as the kubelet drives it, and pods faked on this node
// as root: cgroups named as the kubelet names them, network namespaces.

const (
	dsDriver   = "csi.credproxy.io"
	dsAudience = "credproxy"
	dsNode     = "node-0"
)

// dsEnv is one DaemonSet credproxy and everything around it.
type dsEnv struct {
	kube     *kubetest.Cluster
	vault    *testVault
	db       dbEngine
	k8sMount string
	proxy    *proxyHarness
	csi      csipb.NodeClient
	upstream *httptest.Server
	apiToken string
	route    string // the http route host
	dir      string
}

// dsPod is an app pod: in the API server, with a cgroup (and a network
// namespace) on this node.
type dsPod struct {
	pod    *corev1.Pod
	node   *nodetest.Pod
	target string // where the kubelet mounted the CSI volume
	volume string
	token  string
}

func startDaemonSet(t *testing.T) *dsEnv {
	t.Helper()
	skipShort(t)
	nodetest.RequireRoot(t)
	// Short paths: a unix socket's path must fit in 108 bytes, and the
	// app here reaches its socket through the host's long path (in a
	// container it is the volume's mountPath, /run/credproxy).
	dir, err := os.MkdirTemp("", "ds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	e := &dsEnv{dir: dir}
	e.kube = kubetest.Start(t, kubetest.Options{})
	pg := startPG(t, pgtest.Options{HBA: []string{"host all all 127.0.0.1/32 scram-sha-256"}})
	e.vault = startVault(t)
	if e.vault.kind == "external" {
		t.Skip("an external Vault cannot reach this test's kube-apiserver")
	}
	e.db = e.vault.setupDatabase(t, pg, &dbRole{DefaultTTL: time.Hour, MaxTTL: 2 * time.Hour})
	policy := e.vault.credproxyPolicy(t, e.db, "")

	// Vault's Kubernetes auth reviews tokens with the API server, as a
	// reviewer allowed TokenReview (system:auth-delegator).
	ctx := t.Context()
	e.kube.CreateServiceAccount(t, "kube-system", "vault-reviewer")
	if _, err := e.kube.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "vault-reviewer", Namespace: "kube-system"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	reviewer := e.kube.ServiceAccountToken(t, "kube-system", "vault-reviewer", nil, time.Hour)
	leaks.addSecret("the Vault reviewer's token", reviewer.Token)
	e.k8sMount = e.vault.name("kubernetes")
	e.vault.enableAuth(t, e.k8sMount, "kubernetes")
	e.vault.write(t, "auth/"+e.k8sMount+"/config", map[string]any{
		"kubernetes_host": e.kube.URL, "kubernetes_ca_cert": string(e.kube.CAPEM), "token_reviewer_jwt": reviewer.Token,
	})
	for role, sa := range map[string][2]string{"payments-api": {"payments", "api"}, "shop-web": {"shop", "web"}} {
		e.vault.write(t, "auth/"+e.k8sMount+"/role/"+role, map[string]any{
			"bound_service_account_names": sa[1], "bound_service_account_namespaces": sa[0],
			"audience": dsAudience, "token_policies": policy, "token_ttl": "1h",
		})
	}
	for _, ns := range []string{"payments", "shop", "other"} {
		e.kube.CreateNamespace(t, ns, kubetest.PodSecurityLabels(kubetest.Restricted))
	}
	e.kube.CreateServiceAccount(t, "payments", "api")
	e.kube.CreateServiceAccount(t, "shop", "web")
	e.kube.CreateServiceAccount(t, "other", "nobody")
	e.kube.CreateNode(t, dsNode)

	// An HTTP API the payments pods may call with an injected token.
	e.apiToken = "tok-" + randomHex(t, 16)
	leaks.addSecret("the HTTP route's token", e.apiToken)
	var mu sync.Mutex
	e.upstream = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.Header.Get("Authorization") == "Bearer "+e.apiToken {
			_, _ = io.WriteString(w, "authorized")
			return
		}
		http.Error(w, "no token", http.StatusUnauthorized)
	}))
	t.Cleanup(e.upstream.Close)
	e.route = strings.TrimPrefix(e.upstream.URL, "http://")
	caDir := filepath.Join(e.dir, "ca")
	if err := httpproxy.InitCA(caDir, io.Discard); err != nil {
		t.Fatal(err)
	}

	src := fmt.Sprintf(`
shutdown_grace: 2s
secrets:
  db: {vault: {path: %s}}
  api: {static: {token: %s}}
vault:
  address: %s
  request_timeout: 10s
postgres:
  - name: appdb
    upstream: 127.0.0.1:%d
    credentials: db
    tls: {mode: disable}
http:
  listen: 127.0.0.1:8118
  ca: {cert_file: %s/ca.pem, key_file: %s/ca-key.pem}
  routes:
    - host: %s
      credentials: api
      upstream: http
      inject: {header: {name: Authorization, value: "Bearer {{ .token }}"}}
workloads:
  attribution: csi
  node_name: %s
  peer_check: required
  csi: {endpoint: "unix:%s/plugin/csi.sock", state_dir: %s/pods, driver: %s, audience: %s}
  rules:
    - match: {namespace: payments, service_account: api}
      vault_auth: {role: payments-api, mount: %s}
      allow: [appdb, %q]
    - match: {namespace: shop, service_account: web}
      vault_auth: {role: shop-web, mount: %s}
      allow: [appdb]
`, e.db.CredsPath(), e.apiToken, e.vault.Addr, pg.Port, caDir, caDir, e.route, dsNode,
		e.dir, e.dir, dsDriver, dsAudience, e.k8sMount, e.route, e.k8sMount)
	cfg, err := config.Parse([]byte(src), e.dir)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	e.proxy = startProxy(t, cfg)

	// The CSI node plugin, as cmd/credproxy runs it.
	plugin, err := csi.New(csi.Options{Driver: dsDriver, Audience: dsAudience, Node: dsNode,
		StateDir: cfg.Workloads.CSI.StateDir, Version: "test", Host: e.proxy.srv, Kube: e.kube.Client,
		Logger: newLogger(e.proxy.logs)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := csi.Listen(cfg.Workloads.CSI.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := plugin.Serve(ln); err != nil {
			t.Errorf("csi Serve: %v", err)
		}
	}()
	t.Cleanup(func() { plugin.Close(); <-done })
	conn, err := grpc.NewClient("unix://"+strings.TrimPrefix(cfg.Workloads.CSI.Endpoint, "unix:"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.csi = csipb.NewNodeClient(conn)
	info, err := csipb.NewIdentityClient(conn).GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
	if err != nil || info.Name != dsDriver {
		t.Fatalf("GetPluginInfo = %v, %v", info, err)
	}
	return e
}

// newPod creates an app pod on the node with credproxy's inline CSI
// volume (admitted at Pod Security restricted), and its cgroup here.
func (e *dsEnv) newPod(t *testing.T, ns, name, sa string, netns bool) *dsPod {
	t.Helper()
	pod := kubetest.Pod(ns, name, sa, dsNode)
	pod.Spec.Volumes = []corev1.Volume{{Name: "credproxy", VolumeSource: corev1.VolumeSource{
		CSI: &corev1.CSIVolumeSource{Driver: dsDriver, ReadOnly: ptr.To(true)}}}}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "credproxy", MountPath: "/run/credproxy", ReadOnly: true}}
	p := &dsPod{pod: e.kube.CreatePod(t, pod)}
	p.node = nodetest.NewPod(t, string(p.pod.UID))
	if netns {
		p.node.AddNetns(t)
		p.node.Sandbox(t)
	}
	p.volume = "csi-" + string(p.pod.UID)
	t.Cleanup(func() { _ = e.unpublish(p) })
	p.target = filepath.Join(e.dir, "k", string(p.pod.UID)[:8], "mount")
	return p
}

// publish plays the kubelet: a pod-bound token for credproxy's audience
// (TokenRequest), then NodePublishVolume with podInfoOnMount's context.
func (e *dsEnv) publish(t *testing.T, p *dsPod) error {
	t.Helper()
	tok := e.kube.PodToken(t, p.pod, []string{dsAudience}, 10*time.Minute)
	leaks.addSecret(fmt.Sprintf("the token of pod %s/%s", p.pod.Namespace, p.pod.Name), tok.Token)
	p.token = tok.Token
	tokens, _ := json.Marshal(map[string]any{dsAudience: map[string]any{
		"token": tok.Token, "expirationTimestamp": tok.ExpirationTimestamp.Time}})
	sa := p.pod.Spec.ServiceAccountName
	_, err := e.csi.NodePublishVolume(t.Context(), &csipb.NodePublishVolumeRequest{
		VolumeId:   p.volume,
		TargetPath: p.target,
		VolumeCapability: &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly: true,
		VolumeContext: map[string]string{
			"csi.storage.k8s.io/pod.name": p.pod.Name, "csi.storage.k8s.io/pod.namespace": p.pod.Namespace,
			"csi.storage.k8s.io/pod.uid": string(p.pod.UID), "csi.storage.k8s.io/serviceAccount.name": sa,
			"csi.storage.k8s.io/ephemeral": "true",
		},
		// The CSIDriver's serviceAccountTokenInSecrets: true.
		Secrets: map[string]string{"csi.storage.k8s.io/serviceAccount.tokens": string(tokens)},
	})
	return err
}

func (e *dsEnv) mustPublish(t *testing.T, p *dsPod) {
	t.Helper()
	if err := e.publish(t, p); err != nil {
		t.Fatalf("NodePublishVolume for %s/%s: %v", p.pod.Namespace, p.pod.Name, err)
	}
}

func (e *dsEnv) unpublish(p *dsPod) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.csi.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: p.volume, TargetPath: p.target})
	return err
}

// pgResult is what the helper reports of one Postgres connection.
type pgResult struct {
	User     string `json:"user"`
	Error    string `json:"error"`
	Code     string `json:"code"`
	Ended    string `json:"ended"` // hold: how the held session ended
	Finished bool   `json:"finished"`
}

// TestDaemonSetHelper is the app in a pod: started in the pod's cgroup,
// it connects to $DS_PGHOST (a directory holding .s.PGSQL.5432), asks
// who it is and prints a pgResult; with DS_HOLD it then keeps the session
// until credproxy ends it, and prints how.
func TestDaemonSetHelper(t *testing.T) {
	host := os.Getenv("DS_PGHOST")
	if host == "" {
		return
	}
	out := json.NewEncoder(os.Stdout)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var r pgResult
	conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=5432 user=app dbname=app sslmode=disable connect_timeout=20", host))
	if err == nil {
		err = conn.QueryRow(ctx, "select current_user").Scan(&r.User)
	}
	if err != nil {
		r.Error = err.Error()
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			r.Code, r.Error = pe.Code, pe.Message
		}
	}
	_ = out.Encode(r)
	if err == nil && os.Getenv("DS_HOLD") != "" {
		for {
			if _, err := conn.Exec(ctx, "select 1"); err != nil {
				_ = out.Encode(pgResult{Ended: err.Error(), Finished: true})
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	os.Exit(0)
}

// app runs the helper in pod from (the socket directory of pod to).
type app struct {
	cmd *exec.Cmd
	out *bufio.Scanner
}

func runApp(t *testing.T, from *nodetest.Pod, socketDir string, hold bool) *app {
	t.Helper()
	cmd := from.Command(t, os.Args[0], "-test.run=^TestDaemonSetHelper$")
	cmd.Env = append(os.Environ(), "DS_PGHOST="+socketDir)
	if hold {
		cmd.Env = append(cmd.Env, "DS_HOLD=1")
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = leaks.stream(kindOutput, t.Name())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return &app{cmd: cmd, out: bufio.NewScanner(stdout)}
}

func (a *app) next(t *testing.T) pgResult {
	t.Helper()
	if !a.out.Scan() {
		t.Fatalf("the app printed nothing: %v", a.out.Err())
	}
	leaks.add(kindClient, t.Name(), a.out.Bytes())
	var r pgResult
	if err := json.Unmarshal(a.out.Bytes(), &r); err != nil {
		t.Fatalf("app output %q: %v", a.out.Text(), err)
	}
	return r
}

// connectFrom is one connection by the app in pod from to socketDir.
func connectFrom(t *testing.T, from *nodetest.Pod, socketDir string) pgResult {
	t.Helper()
	a := runApp(t, from, socketDir, false)
	r := a.next(t)
	_ = a.cmd.Wait()
	return r
}

// sessionStart finds the session_start record of db user user.
func (e *dsEnv) sessionStart(t *testing.T, user string) audit.Record {
	t.Helper()
	return e.proxy.waitAudit(t, "session_start of "+user, func(r audit.Record) bool {
		return r.Event == audit.EventSessionStart && r.DBUser == user
	})
}

func wantWorkload(t *testing.T, r audit.Record, p *dsPod, attribution string) {
	t.Helper()
	want := audit.Workload{Namespace: p.pod.Namespace, ServiceAccount: p.pod.Spec.ServiceAccountName, Pod: p.pod.Name,
		PodUID: string(p.pod.UID), Node: dsNode, Attribution: attribution}
	if r.Workload == nil || *r.Workload != want {
		t.Errorf("%s record's workload = %+v, want %+v", r.Event, r.Workload, want)
	}
}

func (e *dsEnv) waitDenied(t *testing.T, p *dsPod, reason string) audit.Record {
	t.Helper()
	return e.proxy.waitAudit(t, "denied "+reason+" for "+p.pod.Name, func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == reason && r.Workload != nil && r.Workload.PodUID == string(p.pod.UID)
	})
}

func TestDaemonSet(t *testing.T) {
	e := startDaemonSet(t)
	ctx := t.Context()
	a := e.newPod(t, "payments", "api-0", "api", true)
	b := e.newPod(t, "shop", "web-0", "web", true)
	c := e.newPod(t, "other", "nobody-0", "nobody", false)
	for _, p := range []*dsPod{a, b, c} {
		e.mustPublish(t, p)
	}
	var userA, userB string

	t.Run("each pod gets its own socket, and its own workload's credential", func(t *testing.T) {
		for _, p := range []*dsPod{a, b} {
			if fi, err := os.Stat(filepath.Join(p.target, ".s.PGSQL.5432")); err != nil || fi.Mode()&os.ModeSocket == 0 {
				t.Fatalf("pod %s has no socket in its volume: %v", p.pod.Name, err)
			}
		}
		ra := connectFrom(t, a.node, a.target)
		rb := connectFrom(t, b.node, b.target)
		if ra.Error != "" || rb.Error != "" {
			t.Fatalf("pod A: %+v; pod B: %+v", ra, rb)
		}
		userA, userB = ra.User, rb.User
		// Same secret name (db), different workloads: different Vault
		// logins, leases and database roles.
		if userA == userB || !strings.HasPrefix(userA, "v-") || !strings.HasPrefix(userB, "v-") {
			t.Fatalf("db users %q and %q: want two different Vault dynamic roles", userA, userB)
		}
		sa, sb := e.sessionStart(t, userA), e.sessionStart(t, userB)
		wantWorkload(t, sa, a, identity.AttributionCSIPeer)
		wantWorkload(t, sb, b, identity.AttributionCSIPeer)
		if sa.Lease == nil || sb.Lease == nil || sa.Lease.IDSHA256 == sb.Lease.IDSHA256 {
			t.Fatalf("leases %+v and %+v: want two different ones", sa.Lease, sb.Lease)
		}
		if sa.Credential != "db" || sb.Credential != "db" {
			t.Errorf("credentials %q, %q: want both db", sa.Credential, sb.Credential)
		}
		// Vault handed out a token per workload.
		tokens := map[string]bool{}
		for _, en := range e.vault.auditEntries(t) {
			if en.Type == "response" && en.Request.Path == "auth/"+e.k8sMount+"/login" && en.Error == "" &&
				en.Response != nil && en.Response.Auth != nil {
				tokens[en.Response.Auth.ClientToken] = true
			}
		}
		if len(tokens) != 2 {
			t.Errorf("%d Vault tokens from logins at auth/%s/login, want one per workload (2)", len(tokens), e.k8sMount)
		}
	})

	t.Run("pod B dials pod A's socket from B's cgroup", func(t *testing.T) {
		r := connectFrom(t, b.node, a.target)
		if r.Code != "28000" || !strings.Contains(r.Error, identity.ReasonPeerMismatch) || r.User != "" {
			t.Fatalf("got %+v, want FATAL 28000 peer mismatch", r)
		}
		rec := e.waitDenied(t, a, identity.ReasonPeerMismatch)
		wantWorkload(t, rec, a, identity.AttributionCSIPeer)
	})

	t.Run("a host process dials pod A's socket", func(t *testing.T) {
		conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=5432 user=app dbname=app sslmode=disable", a.target))
		if err == nil {
			conn.Close(ctx)
			t.Fatal("a host process got a session on pod A's socket")
		}
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "not in a pod's cgroup") {
			t.Fatalf("error %v, want 28000 naming the host process", err)
		}
	})

	t.Run("a pod no rule matches", func(t *testing.T) {
		r := connectFrom(t, c.node, c.target)
		if r.Code != "28000" || !strings.Contains(r.Error, "workload not allowed: no workloads rule matches namespace \"other\"") {
			t.Fatalf("got %+v, want FATAL 28000 workload not allowed", r)
		}
		e.waitDenied(t, c, identity.ReasonNotAllowed)
	})

	t.Run("a relabelled pod: the decision does not change", func(t *testing.T) {
		// Pod B takes pod A's labels (and more): credproxy never looks.
		patch := fmt.Sprintf(`{"metadata":{"labels":{"app":%q,"role":"payments","serviceaccount":"api"}}}`, a.pod.Name)
		if _, err := e.kube.Client.CoreV1().Pods("shop").Patch(ctx, b.pod.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		e.mustPublish(t, b) // the kubelet's periodic republish, with a fresh token
		r := connectFrom(t, b.node, b.target)
		if r.Error != "" || r.User != userB {
			t.Fatalf("pod B after relabelling: %+v, want its own role %q", r, userB)
		}
	})

	t.Run("HTTP in the pod's network namespace", func(t *testing.T) {
		status, body := e.httpFrom(t, a.node, "")
		if status != http.StatusOK || body != "authorized" {
			t.Fatalf("pod A: %d %q, want 200 with the injected token", status, body)
		}
		rec := e.proxy.waitAudit(t, "pod A's request", func(r audit.Record) bool {
			return r.Event == audit.EventRequest && r.Workload != nil && r.Workload.PodUID == string(a.pod.UID)
		})
		wantWorkload(t, rec, a, identity.AttributionNetns)
		// Pod B's listener is its own: it is not allowed the route.
		status, body = e.httpFrom(t, b.node, "")
		if status != http.StatusForbidden || !strings.Contains(body, "workload not allowed") {
			t.Fatalf("pod B: %d %q, want 403 workload not allowed", status, body)
		}
		e.waitDenied(t, b, identity.ReasonNotAllowed)
	})

	t.Run("HTTP with a spoofed source IP", func(t *testing.T) {
		// Pod B (NET_ADMIN in its namespace) takes pod A's IP. No
		// listener credproxy has answers on a node or pod address, and
		// B's own listener still serves B as B.
		nodetest.Run(t, "ip", "netns", "exec", b.node.Netns, "ip", "addr", "add", a.node.IP+"/32", "dev", "cpv"+string(b.pod.UID)[:8]+"p")
		for _, addr := range []string{a.node.IP, a.node.HostIP, b.node.HostIP, b.node.IP} {
			c, err := (&identity.Netns{}).Dial(b.node.NetnsFile(t), nil, "tcp", net.JoinHostPort(addr, "8118"))
			if err == nil {
				c.Close()
				t.Errorf("pod B reached a proxy listener at %s:8118", addr)
			}
		}
		// B's connection to its own listener comes from A's address:
		// credproxy attributes by the listener, never the source, so
		// it still serves B as B.
		status, body := e.httpFrom(t, b.node, a.node.IP)
		if status != http.StatusForbidden || !strings.Contains(body, "namespace \"shop\"") {
			t.Fatalf("pod B with pod A's IP: %d %q, want 403 as pod B", status, body)
		}
		rec := e.proxy.waitAudit(t, "pod B's request from pod A's address", func(r audit.Record) bool {
			return r.Event == audit.EventDenied && r.Client.Addr != "" && strings.HasPrefix(r.Client.Addr, a.node.IP+":")
		})
		wantWorkload(t, rec, b, identity.AttributionNetns)
	})

	t.Run("a deleted pod: its token stops working and its sessions close", func(t *testing.T) {
		held := runApp(t, a.node, a.target, true)
		if r := held.next(t); r.Error != "" {
			t.Fatalf("pod A: %+v", r)
		}
		leaseA := e.sessionStart(t, userA).Lease.IDSHA256
		if err := e.kube.Client.CoreV1().Pods("payments").Delete(ctx, a.pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		// The plugin's watch of the node's pods withdraws the pod: its
		// session ends without the kubelet unpublishing anything.
		end := make(chan pgResult, 1)
		go func() {
			if held.out.Scan() {
				var r pgResult
				_ = json.Unmarshal(held.out.Bytes(), &r)
				end <- r
			}
			close(end)
		}()
		select {
		case r := <-end:
			if !r.Finished {
				t.Fatalf("held session: %+v", r)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("pod A's session still open 30s after the pod was deleted")
		}
		if _, err := os.Stat(filepath.Join(a.target, ".s.PGSQL.5432")); err == nil {
			t.Error("pod A's socket is still there")
		}
		// Its lease is revoked with its workload's Vault token.
		e.waitLeaseGone(t, leaseA)
		// And its token no longer logs in to Vault (after the API
		// server's 10 s authentication cache).
		deadline := time.Now().Add(45 * time.Second)
		for {
			_, err := e.vault.Client.Logical().Write("auth/"+e.k8sMount+"/login", map[string]any{"role": "payments-api", "jwt": a.token})
			if err != nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("a deleted pod's token still logs in to Vault")
			}
			time.Sleep(time.Second)
		}
		if got := e.proxy.srv.Workloads(); len(got) != 2 {
			t.Errorf("published workloads %v, want pods B and C", got)
		}
	})

	t.Run("NodeUnpublishVolume closes the pod's sessions and revokes its leases", func(t *testing.T) {
		held := runApp(t, b.node, b.target, true)
		if r := held.next(t); r.Error != "" {
			t.Fatalf("pod B: %+v", r)
		}
		leaseB := e.sessionStart(t, userB).Lease.IDSHA256
		if err := e.unpublish(b); err != nil {
			t.Fatal(err)
		}
		if r := held.next(t); !r.Finished {
			t.Fatalf("held session: %+v", r)
		}
		e.waitLeaseGone(t, leaseB)
		if _, err := os.Stat(b.target); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the target path is still there: %v", err)
		}
	})

	t.Run("metrics by namespace and service account", func(t *testing.T) {
		text := scrape(t, e.proxy)
		for _, want := range []string{
			`credproxy_workload_decisions_total{result="allowed",workload_namespace="payments",workload_service_account="api"}`,
			`credproxy_workload_decisions_total{result="peer mismatch",workload_namespace="payments",workload_service_account="api"}`,
			`credproxy_workload_decisions_total{result="workload not allowed",workload_namespace="",workload_service_account=""}`,
			`credproxy_workloads_published{workload_namespace="",workload_service_account=""} 1`,
			// The postgres refusals by kind, as every other refusal.
			`credproxy_auth_failures_total{kind="peer_mismatch",protocol="postgres",service="appdb"}`,
			`credproxy_auth_failures_total{kind="workload_not_allowed",protocol="postgres",service="appdb"}`,
		} {
			if !strings.Contains(text, want) {
				t.Errorf("metrics lack %s", want)
			}
		}
		if strings.Contains(text, "nobody") || strings.Contains(text, string(c.pod.UID)) {
			t.Error("a pod no rule matches appears in the metrics by name")
		}
	})
}

// httpFrom sends a GET for the route through the proxy from inside pod's
// network namespace (from local address source when set) and returns the
// status and body.
func (e *dsEnv) httpFrom(t *testing.T, pod *nodetest.Pod, source string) (int, string) {
	t.Helper()
	ns := pod.NetnsFile(t)
	nn := &identity.Netns{}
	d := &net.Dialer{Timeout: 5 * time.Second}
	if source != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(source)}
	}
	var conn net.Conn
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		conn, err = nn.Dial(ns, d, "tcp", "127.0.0.1:8118")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			out, _ := exec.Command("sh", "-c", "stat -L -c %i /run/netns/"+pod.Netns+"; ip netns exec "+pod.Netns+" ss -ltnp").CombinedOutput()
			out2, _ := exec.Command("ss", "-ltnp").CombinedOutput()
			t.Fatalf("no proxy listener in the pod's network namespace: %v\n%s\nhost:\n%s", err, out, out2)
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer conn.Close()
	proxyURL, _ := url.Parse("http://127.0.0.1:8118")
	tr := &http.Transport{Proxy: http.ProxyURL(proxyURL), DialContext: func(context.Context, string, string) (net.Conn, error) { return conn, nil }}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get("http://" + e.route + "/v1/thing")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	leaks.add(kindClient, t.Name(), body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// waitLeaseGone waits until Vault holds no lease whose id hashes to hash.
func (e *dsEnv) waitLeaseGone(t *testing.T, hash string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		found := false
		for _, id := range e.vault.leaseIDs(t, e.db.CredsPath()) {
			sum := sha256.Sum256([]byte(id))
			if hex.EncodeToString(sum[:]) == hash {
				found = true
			}
		}
		if !found {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease %s still held by Vault", hash[:12])
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// scrape reads the proxy's metrics as Prometheus' text format.
func scrape(t *testing.T, p *proxyHarness) string {
	t.Helper()
	mfs, err := p.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			fmt.Fprintf(&b, "%s{%s} %g\n", mf.GetName(), strings.Join(labels, ","), v)
		}
	}
	return b.String()
}
