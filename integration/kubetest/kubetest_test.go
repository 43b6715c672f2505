package kubetest

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
)

// TestVersionsMatchBuildModule keeps KubeVersion and EtcdVersion in step with
// what scripts/kube-bins.sh builds, and the module's staging replaces with
// the Kubernetes version.
func TestVersionsMatchBuildModule(t *testing.T) {
	data, err := os.ReadFile("../../scripts/kubebins/go.mod")
	if err != nil {
		t.Fatal(err)
	}
	gomod := string(data)
	version := func(path string) string {
		m := regexp.MustCompile(`(?m)^\s*(?:require\s+)?` + regexp.QuoteMeta(path) + `\s+(v\S+)`).FindStringSubmatch(gomod)
		if m == nil {
			t.Fatalf("scripts/kubebins/go.mod does not require %s", path)
		}
		return m[1]
	}
	if got := version("k8s.io/kubernetes"); got != KubeVersion {
		t.Errorf("scripts/kubebins/go.mod has k8s.io/kubernetes %s, KubeVersion is %s", got, KubeVersion)
	}
	if got := version("go.etcd.io/etcd/server/v3"); got != EtcdVersion {
		t.Errorf("scripts/kubebins/go.mod has go.etcd.io/etcd/server/v3 %s, EtcdVersion is %s", got, EtcdVersion)
	}
	staging := "v0" + strings.TrimPrefix(KubeVersion, "v1")
	replaces := regexp.MustCompile(`(?m)^\s*(k8s\.io/\S+) => (k8s\.io/\S+) (v\S+)$`).FindAllStringSubmatch(gomod, -1)
	if len(replaces) < 10 {
		t.Fatalf("scripts/kubebins/go.mod replaces %d staging modules, want all of them", len(replaces))
	}
	for _, r := range replaces {
		if r[1] != r[2] || r[3] != staging {
			t.Errorf("scripts/kubebins/go.mod: replace %s => %s %s, want %s %s", r[1], r[2], r[3], r[1], staging)
		}
	}
}

func TestFindBinDirNamesWhatIsMissing(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KUBE_BINDIR", dir)
	if err := os.WriteFile(dir+"/etcd", []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := findBinDir()
	if err == nil || !strings.Contains(err.Error(), "lacks kube-apiserver, stamp") {
		t.Fatalf("findBinDir() error = %v, want one naming kube-apiserver and stamp", err)
	}
}

// TestCluster starts a cluster and uses what the tests built on it rely on:
// the admin client and kubeconfig, bootstrap objects, Pod Security
// admission, ServiceAccount admission without a controller, and tokens:
// minted by TokenRequest bound to a pod on a node, verified by TokenReview
// and, offline, with the service account public key; dead once the pod is.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: runs etcd and kube-apiserver; skipped with -short")
	}
	var c *Cluster
	t.Run("running", func(t *testing.T) {
		c = Start(t, Options{})
		testCluster(t, c)
	})
	if c == nil {
		return
	}
	if c.api == nil || !c.api.exited() || c.etcd == nil || !c.etcd.exited() {
		t.Error("kube-apiserver or etcd still running after the test's Cleanup")
	}
	if _, err := os.Stat(c.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still there after the test's Cleanup: %v", c.Dir, err)
	}
}

func testCluster(t *testing.T, c *Cluster) {
	ctx := t.Context()
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != KubeVersion {
		t.Errorf("server version %s, want %s", v.GitVersion, KubeVersion)
	}

	t.Run("kubeconfig", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		// Bootstrap objects the API server makes itself.
		if _, err := cs.CoreV1().Namespaces().Get(ctx, "kube-system", metav1.GetOptions{}); err != nil {
			t.Error(err)
		}
		if _, err := cs.SchedulingV1().PriorityClasses().Get(ctx, "system-node-critical", metav1.GetOptions{}); err != nil {
			t.Error(err)
		}
		if _, err := cs.RbacV1().ClusterRoles().Get(ctx, "system:auth-delegator", metav1.GetOptions{}); err != nil {
			t.Error(err)
		}
	})

	const ns = "apps"
	c.CreateNamespace(t, ns, PodSecurityLabels(Restricted))
	c.CreateServiceAccount(t, ns, "app")
	node := c.CreateNode(t, "node-0")

	t.Run("pod security restricted is enforced", func(t *testing.T) {
		pod := Pod(ns, "host-network", "app", "")
		pod.Spec.HostNetwork = true
		_, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `violates PodSecurity "restricted:latest"`) {
			t.Fatalf("create host-network pod in a restricted namespace: error = %v, want Forbidden by PodSecurity", err)
		}
	})

	t.Run("service accounts are not created by a controller", func(t *testing.T) {
		_, err := c.Client.CoreV1().Pods(ns).Create(ctx, Pod(ns, "no-sa", "nobody", ""), metav1.CreateOptions{})
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "error looking up service account") {
			t.Fatalf("create pod with a missing service account: error = %v, want Forbidden by ServiceAccount admission", err)
		}
		// CreateNamespace made the default one.
		c.CreatePod(t, Pod(ns, "default-sa", "", ""))
	})

	t.Run("pod-bound token", func(t *testing.T) {
		pod := c.CreatePod(t, Pod(ns, "app-0", "app", node.Name))
		if pod.Spec.NodeName != node.Name || pod.Status.Phase != corev1.PodPending {
			t.Fatalf("pod on node %q in phase %q, want node %q and Pending", pod.Spec.NodeName, pod.Status.Phase, node.Name)
		}
		tok := c.PodToken(t, pod, []string{"vault"}, time.Hour)

		st := c.ReviewToken(t, tok.Token, "vault")
		if !st.Authenticated || st.Error != "" {
			t.Fatalf("review for audience vault: authenticated=%v error=%q", st.Authenticated, st.Error)
		}
		if want := "system:serviceaccount:apps:app"; st.User.Username != want {
			t.Errorf("username %q, want %q", st.User.Username, want)
		}
		if strings.Join(st.Audiences, ",") != "vault" {
			t.Errorf("audiences %v, want [vault]", st.Audiences)
		}
		for key, want := range map[string]string{
			"authentication.kubernetes.io/pod-name":  pod.Name,
			"authentication.kubernetes.io/pod-uid":   string(pod.UID),
			"authentication.kubernetes.io/node-name": node.Name,
			"authentication.kubernetes.io/node-uid":  string(node.UID),
		} {
			if got := st.User.Extra[key]; len(got) != 1 || got[0] != want {
				t.Errorf("extra %s = %v, want [%s]", key, got, want)
			}
		}

		// Not for the API server's own audience.
		if st := c.ReviewToken(t, tok.Token); st.Authenticated {
			t.Error("a token for audience vault authenticated for the API server's audience")
		}

		claims := verifyOffline(t, c, tok.Token)
		if claims.Issuer != Issuer || !claims.Audience.Contains("vault") || claims.Subject != "system:serviceaccount:apps:app" {
			t.Errorf("claims iss=%q aud=%v sub=%q", claims.Issuer, claims.Audience, claims.Subject)
		}
		if got := time.Until(claims.Expiry.Time()); got < 59*time.Minute || got > time.Hour+time.Minute {
			t.Errorf("token expires in %v, want an hour", got)
		}
		if claims.Kubernetes.Pod.Name != pod.Name || claims.Kubernetes.Node.Name != node.Name {
			t.Errorf("claims kubernetes.io = %+v, want pod %s on node %s", claims.Kubernetes, pod.Name, node.Name)
		}

		// Deleting the pod kills its tokens, once the API server's
		// authentication cache (10 s) has let go of it.
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, func() bool { return !c.ReviewToken(t, tok.Token, "vault").Authenticated })
	})

	t.Run("service account token", func(t *testing.T) {
		tok := c.ServiceAccountToken(t, ns, "app", nil, 10*time.Minute)
		st := c.ReviewToken(t, tok.Token)
		if !st.Authenticated || st.User.Username != "system:serviceaccount:apps:app" {
			t.Fatalf("review: authenticated=%v user=%q error=%q", st.Authenticated, st.User.Username, st.Error)
		}
	})
}

// tokenClaims are the claims of a Kubernetes service account token that the
// tests look at.
type tokenClaims struct {
	jwt.Claims
	Kubernetes struct {
		Namespace string `json:"namespace"`
		Pod       struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"pod"`
		Node struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"node"`
	} `json:"kubernetes.io"`
}

// verifyOffline checks token's signature with the service account public
// key, as a JWT verifier outside the cluster (Vault's jwt auth) would.
func verifyOffline(t *testing.T, c *Cluster, token string) tokenClaims {
	t.Helper()
	pemData, err := os.ReadFile(c.ServiceAccountPublicKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemData)
	if block == nil {
		t.Fatalf("%s: no PEM block", c.ServiceAccountPublicKeyFile)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	var claims tokenClaims
	if err := parsed.Claims(pub, &claims); err != nil {
		t.Fatalf("token signature: %v", err)
	}
	return claims
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("condition not met after %v", timeout)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
