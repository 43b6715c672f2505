package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/credproxy/credproxy/integration/kubetest"
)

// nodePluginWarnings are the Pod Security warnings of credproxy as a CSI
// node plugin (DaemonSet mode with per-pod attribution) in a namespace that
// warns at baseline: the DaemonSet's, then its pod's.
var nodePluginWarnings = []string{
	`would violate PodSecurity "baseline:latest": host namespaces (hostPID=true), ` +
		`hostPath volumes (volumes "plugin-dir", "registration-dir", "mountpoint-dir", "state-dir"), ` +
		`privileged (container "credproxy" must not set securityContext.privileged=true)`,
}

// TestManifestsOnAPIServer submits every manifest under kubernetes/ (the
// kustomizations built by kustomize, as `kubectl apply -k` does) and the
// chart rendered with each of helmValueSets to a real kube-apiserver
// (integration/kubetest), in namespaces labelled for Pod Security the way
// the manifests and the README say: schema (strict field validation),
// defaulting and admission are Kubernetes' own, not our decoder's. Every
// workload's pod, as its controller would create it from the stored
// template, goes through pod admission in a server-side dry run, since Pod
// Security only warns on workloads and enforces on pods. Any warning the
// API server gives that the case does not expect fails the test.
func TestManifestsOnAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: runs kube-apiserver and etcd (integration/kubetest); skipped with -short")
	}
	c := kubetest.Start(t, kubetest.Options{})
	s := newSubmitter(t, c)

	// The checks below can fail: what they rely on is on.
	t.Run("the API server refuses", func(t *testing.T) {
		const ns = "refusals"
		c.CreateNamespace(t, ns, kubetest.PodSecurityLabels(kubetest.Restricted))
		c.CreateServiceAccount(t, ns, "credproxy")
		bad := decodeObjects(t, "misspelt", []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bad}\ndatta: {a: b}\n"))
		if _, err := s.create(t, ns, bad[0], nil); err == nil || !strings.Contains(err.Error(), `unknown field "datta"`) {
			t.Errorf("a ConfigMap with a misspelt field: error = %v, want unknown field", err)
		}
		var pods int
		for _, obj := range kustomizeBuild(t, "kubernetes/daemonset") {
			pod, ok := podFromWorkload(t, obj)
			if !ok {
				continue
			}
			pods++
			pod.SetNamespace(ns)
			_, err := s.create(t, ns, pod, []string{metav1.DryRunAll})
			if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `violates PodSecurity "restricted:latest"`) {
				t.Errorf("the DaemonSet's pod in a restricted namespace: error = %v, want Forbidden by PodSecurity", err)
			}
		}
		if pods != 1 {
			t.Errorf("kubernetes/daemonset has %d workloads, want 1", pods)
		}
		// The PodMonitor CRD's schema is checked: an interval that is no
		// Prometheus duration is invalid.
		s.installPodMonitorCRD(t)
		pm := decodeObjects(t, "bad interval", []byte(`apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata: {name: bad}
spec:
  selector: {matchLabels: {app: a}}
  podMetricsEndpoints: [{port: metrics, interval: 30 seconds}]
`))
		if _, err := s.create(t, ns, pm[0], nil); !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "interval") {
			t.Errorf("a PodMonitor with interval \"30 seconds\": error = %v, want Invalid", err)
		}
		_ = s.warnings.take()
	})

	t.Run("kubernetes/sidecar", func(t *testing.T) {
		// The app's namespace: the sidecar example runs at restricted.
		c.CreateNamespace(t, "sidecar", kubetest.PodSecurityLabels(kubetest.Restricted))
		s.submit(t, "sidecar", kustomizeBuild(t, "kubernetes/sidecar"), nil)
	})
	t.Run("kubernetes/daemonset", func(t *testing.T) {
		// The kustomization makes namespace credproxy itself (namespace.yaml):
		// enforce privileged, warn baseline. The node plugin's warnings are
		// what it needs privileged for (see daemonset.yaml), and nothing else.
		s.submit(t, "", kustomizeBuild(t, "kubernetes/daemonset"), nodePluginWarnings)
	})
	t.Run("kubernetes/daemonset/example-app.yaml", func(t *testing.T) {
		// The app's namespace stays at restricted: the inline CSI volume
		// is allowed there, where a hostPath was not.
		const ns = "production"
		c.CreateNamespace(t, ns, kubetest.PodSecurityLabels(kubetest.Restricted))
		c.CreateServiceAccount(t, ns, "app")
		s.submit(t, ns, readManifests(t, "kubernetes/daemonset/example-app.yaml"), nil)
	})

	chrt := loadChart(t)
	for i, vs := range helmValueSets {
		t.Run("helm/"+vs.name, func(t *testing.T) {
			out, err := renderChart(t, chrt, vs.values)
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			var objs []*unstructured.Unstructured
			var notes string
			for _, name := range sortedKeys(out) {
				if filepath.Base(name) == "NOTES.txt" {
					notes = out[name]
					continue
				}
				objs = append(objs, decodeObjects(t, name, []byte(out[name]))...)
			}
			ns := fmt.Sprintf("helm-%d", i)
			appNS := ns
			var warnings []string
			if strings.Contains(vs.values, "mode: daemonset") {
				// As the README: kubectl label namespace credproxy
				// pod-security.kubernetes.io/enforce=privileged; warn at
				// baseline as kubernetes/daemonset/namespace.yaml does.
				c.CreateNamespace(t, ns, map[string]string{
					"pod-security.kubernetes.io/enforce": "privileged",
					"pod-security.kubernetes.io/warn":    "baseline",
				})
				warnings = nodePluginWarnings
				// Apps live in namespaces of their own, at restricted.
				appNS = ns + "-app"
				c.CreateNamespace(t, appNS, kubetest.PodSecurityLabels(kubetest.Restricted))
			} else {
				c.CreateNamespace(t, ns, kubetest.PodSecurityLabels(kubetest.Restricted))
			}
			if vs.serviceAccount != "" {
				c.CreateServiceAccount(t, ns, vs.serviceAccount)
			}
			s.submit(t, ns, objs, warnings)
			// The pod-spec fragment NOTES.txt prints for your own
			// Deployments passes restricted too, merged into an app
			// container that does.
			yours := decodeObjects(t, "NOTES.txt pod spec", []byte(notesDeployment(t, notes)))
			completeApp(t, yours[0])
			s.submit(t, appNS, yours, nil)
		})
	}
}

// submitter creates objects through the dynamic client and records the
// API server's warnings.
type submitter struct {
	c        *kubetest.Cluster
	dyn      dynamic.Interface
	mapper   *restmapper.DeferredDiscoveryRESTMapper
	warnings *warningRecorder
	crds     sync.Once
}

func newSubmitter(t *testing.T, c *kubetest.Cluster) *submitter {
	t.Helper()
	cfg := rest.CopyConfig(c.Config)
	w := &warningRecorder{}
	cfg.WarningHandler = w
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &submitter{c: c, dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)), warnings: w}
}

// warningRecorder is a rest.WarningHandler that keeps the warnings.
type warningRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warningRecorder) HandleWarningHeader(code int, agent, text string) {
	if code != 299 || text == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, text)
}

func (w *warningRecorder) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	msgs := w.msgs
	w.msgs = nil
	return msgs
}

// submit creates objs, in the order kubectl and Helm would (namespaces and
// CRDs first, workloads last), in namespace ns unless an object names its
// own. Each workload's pod then goes through admission in a dry run. Every
// warning must be one of wantWarnings, and each of wantWarnings must come.
func (s *submitter) submit(t *testing.T, ns string, objs []*unstructured.Unstructured, wantWarnings []string) {
	t.Helper()
	if len(objs) == 0 {
		t.Fatal("nothing to submit")
	}
	objs = slices.Clone(objs)
	sort.SliceStable(objs, func(i, j int) bool { return kindOrder(objs[i].GetKind()) < kindOrder(objs[j].GetKind()) })
	_ = s.warnings.take()
	seen := map[string]bool{}
	check := func(what string) {
		for _, w := range s.warnings.take() {
			seen[w] = true
			if !slices.Contains(wantWarnings, w) {
				t.Errorf("%s: the API server warns: %s", what, w)
			}
		}
	}
	for _, obj := range objs {
		what := fmt.Sprintf("%s %s", obj.GetKind(), obj.GetName())
		if obj.GetKind() == "PodMonitor" {
			s.installPodMonitorCRD(t)
		}
		created, err := s.create(t, ns, obj, nil)
		check(what)
		if err != nil {
			t.Errorf("%s: the API server refused it: %v", what, err)
			continue
		}
		if created.GetNamespace() == "" && obj.GetKind() != "Namespace" && obj.GetKind() != "CustomResourceDefinition" {
			// Cluster-scoped (the CSIDriver, RBAC): gone with the case, so
			// the next case can create its own of the same name.
			t.Cleanup(func() { s.remove(t, created) })
		}
		pod, ok := podFromWorkload(t, created)
		if !ok {
			continue
		}
		what = fmt.Sprintf("%s's pod", what)
		if _, err := s.create(t, ns, pod, []string{metav1.DryRunAll}); err != nil {
			t.Errorf("%s: the API server refused it: %v", what, err)
		}
		check(what)
	}
	for _, w := range wantWarnings {
		if !seen[w] {
			t.Errorf("the API server did not warn, as expected: %s", w)
		}
	}
}

// create creates obj with strict field validation (unknown or duplicate
// fields are errors, as `kubectl apply` makes them by default).
func (s *submitter) create(t *testing.T, ns string, obj *unstructured.Unstructured, dryRun []string) (*unstructured.Unstructured, error) {
	t.Helper()
	gvk := obj.GroupVersionKind()
	mapping, err := s.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("the API server serves no %s: %w", gvk, err)
	}
	var ri dynamic.ResourceInterface = s.dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			obj = obj.DeepCopy()
			obj.SetNamespace(ns)
		}
		ri = s.dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	return ri.Create(ctx, obj, metav1.CreateOptions{DryRun: dryRun, FieldValidation: metav1.FieldValidationStrict})
}

// remove deletes a cluster-scoped object.
func (s *submitter) remove(t *testing.T, obj *unstructured.Unstructured) {
	gvk := obj.GroupVersionKind()
	mapping, err := s.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Errorf("delete %s %s: %v", obj.GetKind(), obj.GetName(), err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.dyn.Resource(mapping.Resource).Delete(ctx, obj.GetName(), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("delete %s %s: %v", obj.GetKind(), obj.GetName(), err)
	}
}

// podFromWorkload returns the pod a workload's controller would create
// from its stored (defaulted) template.
func podFromWorkload(t *testing.T, obj *unstructured.Unstructured) (*unstructured.Unstructured, bool) {
	t.Helper()
	switch obj.GroupVersionKind().GroupKind() {
	case schema.GroupKind{Group: "apps", Kind: "Deployment"}, schema.GroupKind{Group: "apps", Kind: "DaemonSet"},
		schema.GroupKind{Group: "apps", Kind: "StatefulSet"}, schema.GroupKind{Group: "batch", Kind: "Job"}:
	default:
		return nil, false
	}
	tmpl, ok, err := unstructured.NestedMap(obj.Object, "spec", "template")
	if err != nil || !ok {
		t.Fatalf("%s %s: no spec.template: %v", obj.GetKind(), obj.GetName(), err)
	}
	pod := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Pod"}}
	if md, ok := tmpl["metadata"].(map[string]any); ok {
		pod.Object["metadata"] = md
	}
	pod.Object["spec"] = tmpl["spec"]
	pod.SetName(strings.ToLower(obj.GetKind()) + "-" + obj.GetName() + "-pod")
	pod.SetNamespace(obj.GetNamespace())
	return pod, true
}

// kindOrder is the order kinds are created in: what others refer to first.
func kindOrder(kind string) int {
	order := []string{"Namespace", "CustomResourceDefinition", "ServiceAccount", "Secret", "ConfigMap",
		"NetworkPolicy", "Service", "DaemonSet", "Deployment"}
	if i := slices.Index(order, kind); i >= 0 {
		return i
	}
	return len(order)
}

// installPodMonitorCRD installs the Prometheus Operator's PodMonitor CRD
// (scripts/kube-bins.sh puts it next to the binaries), once.
func (s *submitter) installPodMonitorCRD(t *testing.T) {
	t.Helper()
	s.crds.Do(func() {
		path := filepath.Join(kubetest.BinDir(t), "crds", "monitoring.coreos.com_podmonitors.yaml")
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v; scripts/kube-bins.sh puts it there", err)
		}
		s.c.InstallCRDs(t, data)
		s.mapper.Reset()
	})
}

// kustomizeBuild builds a kustomization as `kubectl apply -k` does.
func kustomizeBuild(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out, err := rm.AsYaml()
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	return decodeObjects(t, "kustomize build "+dir, out)
}

func readManifests(t *testing.T, path string) []*unstructured.Unstructured {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return decodeObjects(t, path, data)
}

// decodeObjects decodes a multi-document YAML stream, leaving out empty
// documents.
func decodeObjects(t *testing.T, source string, data []byte) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		var obj map[string]any
		err := dec.Decode(&obj)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("%s: %v", source, err)
		}
		if len(obj) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: obj})
	}
}

// completeApp gives container "app" of a Deployment what the user's own
// container has and the NOTES.txt fragment leaves to it: an image, and a
// security context that passes Pod Security "restricted".
func completeApp(t *testing.T, dep *unstructured.Unstructured) {
	t.Helper()
	cs, _, err := unstructured.NestedSlice(dep.Object, "spec", "template", "spec", "containers")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if m, ok := c.(map[string]any); ok && m["name"] == "app" {
			if _, ok := m["securityContext"]; ok {
				t.Fatal("the NOTES.txt fragment sets the app container's securityContext: check it here instead of replacing it")
			}
			m["image"] = "registry.example.com/app:1.0"
			m["securityContext"] = map[string]any{
				"allowPrivilegeEscalation": false,
				"capabilities":             map[string]any{"drop": []any{"ALL"}},
			}
			if err := unstructured.SetNestedSlice(dep.Object, cs, "spec", "template", "spec", "containers"); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatal("the Deployment has no container app")
}
