package csi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/credproxy/credproxy/identity"
)

const (
	testNode = "node-0"
	podUID   = "0b9c6f2e-1d2a-4c3b-9e8f-7a6b5c4d3e2f"
	saUID    = "11111111-2222-3333-4444-555555555555"
)

// fakeHost records what the plugin asks of the engine.
type fakeHost struct {
	mu          sync.Mutex
	published   map[string]*identity.Workload
	publishes   int
	unpublished []string
}

func (h *fakeHost) PublishWorkload(w *identity.Workload, dir string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.publishes++
	h.published[w.PodUID] = w
	return nil
}

func (h *fakeHost) UnpublishWorkload(uid string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.unpublished = append(h.unpublished, uid)
	_, ok := h.published[uid]
	delete(h.published, uid)
	return ok
}

// fakeMounter records mounts instead of making them.
type fakeMounter struct {
	mu      sync.Mutex
	mounted map[string]string
}

func (m *fakeMounter) Mount(dir, target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mounted[target] = dir
	return nil
}

func (m *fakeMounter) Unmount(target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.mounted, target)
	return nil
}

// token is an (unsigned) service account token with the claims the
// kubelet's TokenRequest puts in.
func token(ns, sa, pod, uid, node string) string {
	claims := map[string]any{"kubernetes.io": map[string]any{
		"namespace": ns, "serviceaccount": map[string]any{"name": sa, "uid": saUID},
		"pod": map[string]any{"name": pod, "uid": uid}, "node": map[string]any{"name": node},
	}}
	b, _ := json.Marshal(claims)
	return "eyJhbGciOiJSUzI1NiJ9." + base64.RawURLEncoding.EncodeToString(b) + ".c2ln"
}

func tokens(tok string) string {
	b, _ := json.Marshal(map[string]any{"credproxy": map[string]any{"token": tok, "expirationTimestamp": time.Now().Add(time.Hour)}})
	return string(b)
}

func volumeContext() map[string]string {
	return map[string]string{ctxPodName: "api-0", ctxPodNamespace: "payments", ctxPodUID: podUID,
		ctxServiceAccount: "api", ctxEphemeral: "true"}
}

func publishRequest(vc, secrets map[string]string) *csipb.NodePublishVolumeRequest {
	return &csipb.NodePublishVolumeRequest{VolumeId: "vol-1", TargetPath: "/var/lib/kubelet/pods/x/mount",
		VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}},
		VolumeContext:    vc, Secrets: secrets}
}

func newTestServer(t *testing.T, pods ...*corev1.Pod) (*Server, *fakeHost, *fakeMounter, *fake.Clientset) {
	t.Helper()
	kube := fake.NewClientset()
	for _, p := range pods {
		if _, err := kube.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	h := &fakeHost{published: map[string]*identity.Workload{}}
	m := &fakeMounter{mounted: map[string]string{}}
	s, err := New(Options{Driver: "csi.credproxy.io", Audience: "credproxy", Node: testNode,
		StateDir: filepath.Join(t.TempDir(), "pods"), Host: h, Kube: kube, Mounter: m})
	if err != nil {
		t.Fatal(err)
	}
	return s, h, m, kube
}

func apiPod(node, sa string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "payments", Name: "api-0", UID: types.UID(podUID)},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa}}
}

func TestNodePublishVolume(t *testing.T) {
	good := token("payments", "api", "api-0", podUID, testNode)
	tests := []struct {
		name    string
		pod     *corev1.Pod
		vc      func(map[string]string)
		secrets map[string]string
		code    codes.Code
		msg     string
	}{
		{"token as a CSI secret", apiPod(testNode, "api"), nil, map[string]string{ctxTokens: tokens(good)}, codes.OK, ""},
		{"token in the volume context", apiPod(testNode, "api"), func(vc map[string]string) { vc[ctxTokens] = tokens(good) }, nil, codes.OK, ""},
		{"a persistent volume", apiPod(testNode, "api"), func(vc map[string]string) { delete(vc, ctxEphemeral) },
			map[string]string{ctxTokens: tokens(good)}, codes.InvalidArgument, "inline"},
		{"no pod info", apiPod(testNode, "api"), func(vc map[string]string) { delete(vc, ctxPodUID) },
			map[string]string{ctxTokens: tokens(good)}, codes.InvalidArgument, "podInfoOnMount"},
		{"no token for credproxy's audience", apiPod(testNode, "api"), nil, nil, codes.InvalidArgument, "tokenRequests"},
		{"a token of another service account", apiPod(testNode, "api"), nil,
			map[string]string{ctxTokens: tokens(token("payments", "batch", "api-0", podUID, testNode))}, codes.PermissionDenied, "another service account"},
		{"a token bound to another pod", apiPod(testNode, "api"), nil,
			map[string]string{ctxTokens: tokens(token("payments", "api", "api-1", podUID, testNode))}, codes.PermissionDenied, "another pod"},
		{"a token bound to another node", apiPod(testNode, "api"), nil,
			map[string]string{ctxTokens: tokens(token("payments", "api", "api-0", podUID, "node-9"))}, codes.PermissionDenied, "another node"},
		{"no such pod in the API server", nil, nil, map[string]string{ctxTokens: tokens(good)}, codes.NotFound, "no such pod"},
		{"the pod is scheduled elsewhere", apiPod("node-9", "api"), nil, map[string]string{ctxTokens: tokens(good)}, codes.PermissionDenied, "node-9"},
		{"the kubelet names another service account", apiPod(testNode, "batch"), nil, map[string]string{ctxTokens: tokens(good)}, codes.PermissionDenied, "service account"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var pods []*corev1.Pod
			if tt.pod != nil {
				pods = append(pods, tt.pod)
			}
			s, h, m, _ := newTestServer(t, pods...)
			vc := volumeContext()
			if tt.vc != nil {
				tt.vc(vc)
			}
			_, err := s.NodePublishVolume(t.Context(), publishRequest(vc, tt.secrets))
			if got := status.Code(err); got != tt.code || (err != nil && !strings.Contains(err.Error(), tt.msg)) {
				t.Fatalf("NodePublishVolume: %v, want %v containing %q", err, tt.code, tt.msg)
			}
			if tt.code != codes.OK {
				if len(h.published) != 0 || len(m.mounted) != 0 {
					t.Error("a refused volume was published or mounted")
				}
				if strings.Contains(err.Error(), "c2ln") || strings.Contains(err.Error(), "eyJ") {
					t.Error("the error shows the token")
				}
				return
			}
			w := h.published[podUID]
			if w == nil || w.Namespace != "payments" || w.ServiceAccount != "api" || w.ServiceAccountUID != saUID || w.Node != testNode {
				t.Fatalf("published %+v", w)
			}
			if tok, _ := w.Token().Get(); tok.Reveal() != good {
				t.Error("the workload does not hold the pod's token")
			}
			dir := m.mounted["/var/lib/kubelet/pods/x/mount"]
			if fi, err := os.Stat(dir); err != nil || !fi.IsDir() || filepath.Base(dir) != podUID {
				t.Fatalf("mounted %q: %v", dir, err)
			}
			// Republish: same volume, a fresh token.
			if _, err := s.NodePublishVolume(t.Context(), publishRequest(vc, tt.secrets)); err != nil || h.publishes != 2 {
				t.Fatalf("republish: %v (publishes %d)", err, h.publishes)
			}
			// Unpublish withdraws the pod; unknown volumes succeed.
			req := &csipb.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: "/var/lib/kubelet/pods/x/mount"}
			for range 2 {
				if _, err := s.NodeUnpublishVolume(t.Context(), req); err != nil {
					t.Fatal(err)
				}
			}
			if len(h.unpublished) != 1 || len(m.mounted) != 0 {
				t.Errorf("unpublished %v, mounted %v", h.unpublished, m.mounted)
			}
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Errorf("the pod's directory is still there: %v", err)
			}
		})
	}
}

// TestPodWatchWithdrawsDeletedPods: a pod deleted from the API server is
// withdrawn though the kubelet never unpublishes it.
func TestPodWatchWithdrawsDeletedPods(t *testing.T) {
	s, h, m, kube := newTestServer(t, apiPod(testNode, "api"))
	watching := make(chan struct{}, 1)
	s.hookWatching = func() {
		select {
		case watching <- struct{}{}:
		default:
		}
	}
	ln, err := Listen("unix:" + filepath.Join(t.TempDir(), "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Serve(ln)
	}()
	defer func() { s.Close(); <-done }()
	if _, err := s.NodePublishVolume(t.Context(), publishRequest(volumeContext(),
		map[string]string{ctxTokens: tokens(token("payments", "api", "api-0", podUID, testNode))})); err != nil {
		t.Fatal(err)
	}
	<-watching
	if err := kube.CoreV1().Pods("payments").Delete(t.Context(), "api-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		h.mu.Lock()
		n := len(h.unpublished)
		h.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the deleted pod was not withdrawn")
		}
		time.Sleep(20 * time.Millisecond)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.mounted) != 0 {
		t.Errorf("the deleted pod's volume is still mounted: %v", m.mounted)
	}
}

func unpublishRequest(target string) *csipb.NodeUnpublishVolumeRequest {
	return &csipb.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}
}
