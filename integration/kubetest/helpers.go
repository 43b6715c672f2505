package kubetest

import (
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// Pod Security Standards levels, for PodSecurityLabels.
const (
	Privileged = "privileged"
	Baseline   = "baseline"
	Restricted = "restricted"
)

// PodSecurityLabels are the labels that make Pod Security admission enforce
// level in a namespace (and warn and audit at it), at the latest version.
func PodSecurityLabels(level string) map[string]string {
	const prefix = "pod-security.kubernetes.io/"
	return map[string]string{
		prefix + "enforce": level, prefix + "enforce-version": "latest",
		prefix + "warn": level, prefix + "warn-version": "latest",
		prefix + "audit": level, prefix + "audit-version": "latest",
	}
}

// CreateNamespace creates namespace name with labels (PodSecurityLabels,
// say), and its "default" ServiceAccount, which the (absent) service
// account controller would create and which pods without
// serviceAccountName need.
func (c *Cluster) CreateNamespace(t testing.TB, name string, labels map[string]string) *corev1.Namespace {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	ns, err := c.Client.CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: create namespace %s: %v", name, err)
	}
	c.CreateServiceAccount(t, name, "default")
	return ns
}

// CreateServiceAccount creates ServiceAccount ns/name.
func (c *Cluster) CreateServiceAccount(t testing.TB, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	sa, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: create service account %s/%s: %v", ns, name, err)
	}
	return sa
}

// CreateNode creates a Node object: no kubelet stands behind it, but pods
// can name it in spec.nodeName, and tokens bound to its pods carry its name
// and UID.
func (c *Cluster) CreateNode(t testing.TB, name string) *corev1.Node {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	node, err := c.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   name,
		Labels: map[string]string{corev1.LabelHostname: name},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: create node %s: %v", name, err)
	}
	return node
}

// Pod returns a pod that passes Pod Security "restricted": one container,
// non-root, no privilege escalation, all capabilities dropped, the
// RuntimeDefault seccomp profile. Its image is never pulled. Change what the
// test needs, then CreatePod.
func Pod(ns, name, serviceAccount, nodeName string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			NodeName:           nodeName,
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   ptr.To(true),
				RunAsUser:      ptr.To[int64](65532),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "registry.k8s.io/pause:3.10",
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptr.To(false),
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
}

// CreatePod creates pod in its namespace and returns it as stored.
func (c *Cluster) CreatePod(t testing.TB, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	got, err := c.Client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: create pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	return got
}

// PodToken mints a token for pod's ServiceAccount, bound to pod (TokenRequest
// with a boundObjectRef: it stops authenticating once the pod is deleted),
// for audiences, valid for ttl (the API server's minimum is 10 minutes).
func (c *Cluster) PodToken(t testing.TB, pod *corev1.Pod, audiences []string, ttl time.Duration) *authenticationv1.TokenRequestStatus {
	t.Helper()
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return c.requestToken(t, pod.Namespace, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         audiences,
		ExpirationSeconds: ptr.To(int64(ttl / time.Second)),
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}})
}

// ServiceAccountToken mints a token for ServiceAccount ns/name bound to no
// object, for audiences, valid for ttl.
func (c *Cluster) ServiceAccountToken(t testing.TB, ns, name string, audiences []string, ttl time.Duration) *authenticationv1.TokenRequestStatus {
	t.Helper()
	return c.requestToken(t, ns, name, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         audiences,
		ExpirationSeconds: ptr.To(int64(ttl / time.Second)),
	}})
}

func (c *Cluster) requestToken(t testing.TB, ns, sa string, req *authenticationv1.TokenRequest) *authenticationv1.TokenRequestStatus {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	got, err := c.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: token request for service account %s/%s: %v", ns, sa, err)
	}
	if got.Status.Token == "" {
		t.Fatalf("kubetest: token request for service account %s/%s returned no token", ns, sa)
	}
	return &got.Status
}

// ReviewToken asks the API server who token authenticates as (TokenReview),
// for audiences (none: the API server's own). A token that does not
// authenticate is a status with Authenticated false and an Error, not a
// test failure.
func (c *Cluster) ReviewToken(t testing.TB, token string, audiences ...string) authenticationv1.TokenReviewStatus {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	got, err := c.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: token review: %v", err)
	}
	return got.Status
}
