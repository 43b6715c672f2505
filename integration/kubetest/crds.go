package kubetest

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
)

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// crdEstablishTimeout bounds the wait for a CRD's API to be served.
const crdEstablishTimeout = time.Minute

// InstallCRDs creates the CustomResourceDefinitions in yamlDocs (one or more
// YAML documents) and waits until each is Established, i.e. its API is
// served. The API server establishes CRDs itself; no controller is needed.
// Callers with a cached discovery client or REST mapper must reset it.
func (c *Cluster) InstallCRDs(t testing.TB, yamlDocs []byte) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	crds := dyn.Resource(crdResource)
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(yamlDocs), 4096)
	var names []string
	for {
		var obj map[string]any
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("kubetest: decode CRDs: %v", err)
		}
		if len(obj) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		if u.GetKind() != "CustomResourceDefinition" {
			t.Fatalf("kubetest: InstallCRDs got a %s %s", u.GetKind(), u.GetName())
		}
		ctx, cancel := ctx()
		_, err := crds.Create(ctx, u, metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict})
		cancel()
		if err != nil {
			t.Fatalf("kubetest: create CRD %s: %v", u.GetName(), err)
		}
		names = append(names, u.GetName())
	}
	if len(names) == 0 {
		t.Fatal("kubetest: InstallCRDs got no CRD")
	}
	deadline := time.Now().Add(crdEstablishTimeout)
	for _, name := range names {
		for !c.crdEstablished(t, crds, name) {
			if time.Now().After(deadline) {
				t.Fatalf("kubetest: CRD %s not Established after %v", name, crdEstablishTimeout)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (c *Cluster) crdEstablished(t testing.TB, crds dynamic.NamespaceableResourceInterface, name string) bool {
	t.Helper()
	ctx, cancel := ctx()
	defer cancel()
	u, err := crds.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("kubetest: get CRD %s: %v", name, err)
	}
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, cond := range conds {
		m, _ := cond.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}
