// Package kubetest runs a real Kubernetes API server for integration tests:
// etcd and kube-apiserver as plain processes, on free loopback ports, with
// their data, certificates and logs in the test's temp dir.
//
// What runs is the control plane's front half only: the API server, with its
// default admission chain (Pod Security among it), RBAC and Node
// authorization, service account tokens (TokenRequest, TokenReview, bound
// tokens) and OIDC discovery. No controller manager, scheduler or kubelet
// runs, so objects are stored, defaulted, validated and admitted as in a real
// cluster, but nothing acts on them: a Deployment gets no ReplicaSet, a Pod
// stays Pending (set spec.nodeName to place it), a deleted Namespace stays
// Terminating, and no "default" ServiceAccount appears in a new namespace
// (CreateNamespace makes one, as the controller would).
//
// The binaries come from scripts/kube-bins.sh, built from
// scripts/kubebins/go.mod and cached by version. When they are missing the
// test fails, naming that script: a suite that silently skips its
// integration tests looks green while testing nothing.
package kubetest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// The versions scripts/kube-bins.sh builds (scripts/kubebins/go.mod; a test
// keeps the two in step).
const (
	KubeVersion = "v1.37.2"
	EtcdVersion = "v3.7.0"
)

// What Start configures.
const (
	// Issuer is the service account token issuer (--service-account-issuer).
	Issuer = "https://kubernetes.default.svc.cluster.local"
	// APIAudience is the API server's own audience (--api-audiences): a
	// token for any other audience does not authenticate to it.
	APIAudience = Issuer
	// AdminUser is the CommonName of the admin client certificate, in group
	// system:masters.
	AdminUser = "kubetest-admin"

	serviceClusterIPRange = "10.96.0.0/16"
	kubernetesServiceIP   = "10.96.0.1"

	startAttempts     = 3 // FreePort can race with other listeners
	etcdReadyTimeout  = time.Minute
	apiReadyTimeout   = 3 * time.Minute // a cold start on a busy 2-core machine takes tens of seconds
	apiStopGrace      = 30 * time.Second
	etcdStopGrace     = 15 * time.Second
	defaultRequestTTL = time.Minute // of each helper's API call
)

// Options configures Start. The zero value is what most tests want.
type Options struct {
	// APIServerArgs are appended to kube-apiserver's command line, e.g.
	// "--feature-gates=...". A single-valued flag given here overrides
	// Start's (the last occurrence wins); a list flag such as
	// --enable-admission-plugins adds to it.
	APIServerArgs []string
}

// Cluster is a running API server and its etcd, stopped by the test's
// Cleanup. Its fields are read-only.
type Cluster struct {
	URL    string               // https://127.0.0.1:PORT
	Config *rest.Config         // admin (system:masters); copy it before changing it
	Client kubernetes.Interface // from Config

	CAFile     string // PEM of the CA that signed the serving and client certificates
	CAPEM      []byte
	Kubeconfig string // a kubeconfig file for the admin, for tools that take --kubeconfig
	// ServiceAccountPublicKeyFile is the PEM public key that verifies
	// service account tokens, as --service-account-key-file.
	ServiceAccountPublicKeyFile string

	EtcdURL string
	Dir     string // the temp dir holding data, certificates and logs

	etcd, api *process
	pki       *pki
	files     pkiFiles
}

// BinDir returns the directory holding kube-apiserver and etcd: $KUBE_BINDIR
// if set, else scripts/kube-bins.sh's cache directory for KubeVersion and
// EtcdVersion. It fails the test when they are not there.
func BinDir(t testing.TB) string {
	t.Helper()
	dir, err := findBinDir()
	if err != nil {
		t.Fatalf("kubetest: %v; run scripts/kube-bins.sh to build them (make test and make integration do)", err)
	}
	return dir
}

// DefaultBinDir is where scripts/kube-bins.sh puts the binaries when
// KUBE_BINDIR is not set.
func DefaultBinDir() (string, error) {
	cache, err := os.UserCacheDir() // $XDG_CACHE_HOME, else $HOME/.cache: as the script
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "credproxy", "kube", "kubernetes-"+KubeVersion+"-etcd-"+EtcdVersion), nil
}

func findBinDir() (string, error) {
	dir := os.Getenv("KUBE_BINDIR")
	where := "KUBE_BINDIR=" + dir
	if dir == "" {
		var err error
		if dir, err = DefaultBinDir(); err != nil {
			return "", fmt.Errorf("no cache directory for the kube-apiserver and etcd binaries: %w", err)
		}
		where = dir
	}
	var missing []string
	for _, name := range []string{"kube-apiserver", "etcd", "stamp"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || (name != "stamp" && fi.Mode()&0o111 == 0) {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("kube-apiserver %s and etcd %s not found: %s lacks %s (a missing stamp is an unfinished build)",
			KubeVersion, EtcdVersion, where, strings.Join(missing, ", "))
	}
	return dir, nil
}

// FreePort returns a loopback TCP port that was free a moment ago. Another
// process may take it before the caller binds it, so callers retry.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("kubetest: find free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Start runs etcd and kube-apiserver, waits until the API server's /readyz
// passes (its bootstrap is done: the default namespaces, priority classes
// and RBAC roles exist), and registers a Cleanup that stops both and removes
// their files. It must be called from the test's goroutine.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	binDir := BinDir(t)
	began := time.Now()
	c := &Cluster{Dir: t.TempDir()}
	for _, sub := range []string{"etcd", "pki"} {
		if err := os.Mkdir(filepath.Join(c.Dir, sub), 0o700); err != nil {
			t.Fatalf("kubetest: %v", err)
		}
	}
	var err error
	if c.pki, err = newPKI(); err != nil {
		t.Fatalf("kubetest: certificates: %v", err)
	}
	if c.files, err = c.pki.write(filepath.Join(c.Dir, "pki")); err != nil {
		t.Fatalf("kubetest: write certificates: %v", err)
	}
	c.CAFile, c.CAPEM = c.files.CA, c.pki.ca.certPEM
	c.ServiceAccountPublicKeyFile = c.files.SAPublicKey

	// Cleanups run last-in first-out: the API server stops before etcd.
	t.Cleanup(func() { c.etcd.stop(t, etcdStopGrace) })
	c.startEtcd(t, binDir)
	t.Cleanup(func() { c.api.stop(t, apiStopGrace) })
	c.startAPIServer(t, binDir, opts)
	t.Logf("kubetest: kube-apiserver %s at %s ready in %v", KubeVersion, c.URL, time.Since(began).Round(time.Millisecond))
	return c
}

func (c *Cluster) startEtcd(t testing.TB, binDir string) {
	t.Helper()
	logFile := filepath.Join(c.Dir, "etcd.log")
	for attempt := 1; ; attempt++ {
		clientURL := "http://127.0.0.1:" + strconv.Itoa(FreePort(t))
		peerURL := "http://127.0.0.1:" + strconv.Itoa(FreePort(t))
		offset := fileSize(logFile)
		p, err := launch("etcd", filepath.Join(binDir, "etcd"), c.Dir, logFile, []string{
			"--name=kubetest",
			"--data-dir=" + filepath.Join(c.Dir, "etcd"),
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=kubetest=" + peerURL,
			"--initial-cluster-state=new",
			// Nothing here needs to survive a crash, and fsync dominates
			// etcd's write latency on a busy disk.
			"--unsafe-no-fsync",
			"--log-level=warn",
		})
		if err != nil {
			t.Fatalf("kubetest: %v", err)
		}
		c.etcd, c.EtcdURL = p, clientURL
		err = p.waitFor(etcdReadyTimeout, func(ctx context.Context) error {
			return httpOK(ctx, http.DefaultClient, clientURL+"/health")
		})
		if err == nil {
			return
		}
		if attempt < startAttempts && p.exited() && portTaken(logFile, offset) {
			t.Logf("kubetest: etcd's port was taken, retrying")
			continue
		}
		p.stop(t, etcdStopGrace)
		t.Fatalf("kubetest: start etcd: %v\n%s", err, p.logTail(offset))
	}
}

func (c *Cluster) startAPIServer(t testing.TB, binDir string, opts Options) {
	t.Helper()
	logFile := filepath.Join(c.Dir, "kube-apiserver.log")
	f := c.files
	for attempt := 1; ; attempt++ {
		port := FreePort(t)
		c.URL = "https://127.0.0.1:" + strconv.Itoa(port)
		args := []string{
			"--etcd-servers=" + c.EtcdURL,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			// The lease reconciler keeps default/kubernetes' endpoints at
			// the advertise address, which may not be loopback; no pod runs
			// to use them.
			"--endpoint-reconciler-type=none",
			"--secure-port=" + strconv.Itoa(port),
			"--cert-dir=" + filepath.Join(c.Dir, "pki"),
			"--tls-cert-file=" + f.ServerCert,
			"--tls-private-key-file=" + f.ServerKey,
			"--client-ca-file=" + f.CA,
			"--service-account-issuer=" + Issuer,
			"--service-account-key-file=" + f.SAPublicKey,
			"--service-account-signing-key-file=" + f.SAPrivateKey,
			"--api-audiences=" + APIAudience,
			"--service-cluster-ip-range=" + serviceClusterIPRange,
			"--authorization-mode=Node,RBAC",
			// As kubeadm: NodeRestriction on top of the default plugins
			// (which include PodSecurity, ServiceAccount and Priority),
			// and privileged containers allowed (Pod Security decides).
			"--enable-admission-plugins=NodeRestriction",
			"--allow-privileged=true",
			"--profiling=false",
			"--shutdown-delay-duration=0s",
		}
		args = append(args, opts.APIServerArgs...)
		offset := fileSize(logFile)
		p, err := launch("kube-apiserver", filepath.Join(binDir, "kube-apiserver"), c.Dir, logFile, args)
		if err != nil {
			t.Fatalf("kubetest: %v", err)
		}
		c.api = p
		if err := c.clientConfig(); err != nil {
			p.stop(t, apiStopGrace)
			t.Fatalf("kubetest: %v", err)
		}
		hc, err := rest.HTTPClientFor(c.Config)
		if err != nil {
			p.stop(t, apiStopGrace)
			t.Fatalf("kubetest: %v", err)
		}
		err = p.waitFor(apiReadyTimeout, func(ctx context.Context) error {
			return httpOK(ctx, hc, c.URL+"/readyz")
		})
		hc.CloseIdleConnections()
		if err == nil {
			return
		}
		if attempt < startAttempts && p.exited() && portTaken(logFile, offset) {
			t.Logf("kubetest: kube-apiserver's port %d was taken, retrying", port)
			continue
		}
		p.stop(t, apiStopGrace)
		t.Fatalf("kubetest: start kube-apiserver: %v\n%s", err, p.logTail(offset))
	}
}

// clientConfig sets Config, Client and Kubeconfig for the current URL.
func (c *Cluster) clientConfig() error {
	c.Config = &rest.Config{
		Host: c.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   c.pki.ca.certPEM,
			CertData: c.pki.adminCert,
			KeyData:  c.pki.adminKey,
		},
		// Tests create objects in bursts; client-side throttling would only
		// slow them down.
		QPS:       200,
		Burst:     400,
		UserAgent: "kubetest",
	}
	var err error
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: c.URL, CertificateAuthority: c.files.CA}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: c.files.AdminCert, ClientKey: c.files.AdminKey}
	kc.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "admin"}
	kc.CurrentContext = "kubetest"
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, c.Kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// httpOK GETs url and wants 200.
func httpOK(ctx context.Context, hc *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body := make([]byte, 4<<10)
	n, _ := resp.Body.Read(body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body[:n])))
	}
	return nil
}

// LogTail returns the last lines of the API server's log.
func (c *Cluster) LogTail() string { return c.api.logTail(0) }

// EtcdLogTail returns the last lines of etcd's log.
func (c *Cluster) EtcdLogTail() string { return c.etcd.logTail(0) }

// ctx is the context of one helper's API call: bounded, and not the test's
// context, which is already canceled when Cleanup functions run.
func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), defaultRequestTTL)
}
