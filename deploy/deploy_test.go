package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/credproxy/credproxy/config"
)

// kustomization is the part of kustomize's Kustomization the manifests use;
// decoding into it strictly still rejects any other key.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace,omitempty"`
	Resources  []string `json:"resources"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors,omitempty"`
		IncludeTemplates bool              `json:"includeTemplates,omitempty"`
	} `json:"labels,omitempty"`
}

// podMonitor is the part of the Prometheus Operator's PodMonitor the chart renders.
type podMonitor struct {
	metav1.TypeMeta `json:",inline"`
	Metadata        metav1.ObjectMeta `json:"metadata"`
	Spec            struct {
		Selector            metav1.LabelSelector `json:"selector"`
		PodMetricsEndpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// kinds maps apiVersion/kind to the Go type a manifest must decode into. A
// manifest of any other kind fails the tests: add its type here.
var kinds = map[string]func() any{
	"apps/v1/Deployment":                       func() any { return &appsv1.Deployment{} },
	"apps/v1/DaemonSet":                        func() any { return &appsv1.DaemonSet{} },
	"v1/ConfigMap":                             func() any { return &corev1.ConfigMap{} },
	"v1/Secret":                                func() any { return &corev1.Secret{} },
	"v1/Service":                               func() any { return &corev1.Service{} },
	"v1/ServiceAccount":                        func() any { return &corev1.ServiceAccount{} },
	"v1/Namespace":                             func() any { return &corev1.Namespace{} },
	"networking.k8s.io/v1/NetworkPolicy":       func() any { return &networkingv1.NetworkPolicy{} },
	"storage.k8s.io/v1/CSIDriver":              func() any { return &storagev1.CSIDriver{} },
	"rbac.authorization.k8s.io/v1/ClusterRole": func() any { return &rbacv1.ClusterRole{} },
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": func() any { return &rbacv1.ClusterRoleBinding{} },
	"kustomize.config.k8s.io/v1beta1/Kustomization":   func() any { return &kustomization{} },
	"monitoring.coreos.com/v1/PodMonitor":             func() any { return &podMonitor{} },
}

// manifest is one decoded YAML document.
type manifest struct {
	Source string // file#document
	Kind   string
	Name   string
	Object any
}

// decodeManifests decodes every document of a multi-document YAML stream
// strictly: duplicate keys, unknown fields and case-mismatched field names
// (which encoding/json would accept) are errors, as in the API server.
func decodeManifests(source string, data []byte) ([]manifest, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []manifest
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", source, err)
		}
		src := fmt.Sprintf("%s#%d", source, i)
		j, err := sigsyaml.YAMLToJSONStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", src, err)
		}
		if string(bytes.TrimSpace(j)) == "null" {
			continue // only comments
		}
		var tm metav1.TypeMeta
		if err := kjson.UnmarshalCaseSensitivePreserveInts(j, &tm); err != nil {
			return nil, fmt.Errorf("%s: %w", src, err)
		}
		newObj, ok := kinds[tm.APIVersion+"/"+tm.Kind]
		if !ok {
			return nil, fmt.Errorf("%s: no Go type for apiVersion %q kind %q", src, tm.APIVersion, tm.Kind)
		}
		obj := newObj()
		strict, err := kjson.UnmarshalStrict(j, obj)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", src, tm.Kind, err)
		}
		if len(strict) > 0 {
			return nil, fmt.Errorf("%s: %s: %w", src, tm.Kind, errors.Join(strict...))
		}
		var meta struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		_ = kjson.UnmarshalCaseSensitivePreserveInts(j, &meta)
		out = append(out, manifest{Source: src, Kind: tm.Kind, Name: meta.Metadata.Name, Object: obj})
	}
}

func TestDecodeManifestsIsStrict(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"unknown field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndatta: {}\n", "unknown field"},
		{"misspelt nested field", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, labelz: {}}\n", "unknown field"},
		{"wrong case", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\nautomountserviceaccounttoken: false\n", "unknown field"},
		{"duplicate key", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {}\ndata: {}\n", "already set"},
		{"wrong type", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {replicas: two}\n", "replicas"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n", "no Go type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := decodeManifests("test.yaml", []byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("decode error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestKubernetesManifests decodes every manifest under kubernetes/ strictly,
// checks each kustomization's resources, and checks every pod that runs
// credproxy: its config passes credproxy's own validation against the files
// its volumes provide, it is hardened and probed, and the apps' environment
// points at credproxy's listeners.
func TestKubernetesManifests(t *testing.T) {
	dirs, err := filepath.Glob("kubernetes/*")
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) < 2 {
		t.Fatalf("kubernetes/ has %d example directories, want sidecar and daemonset", len(dirs))
	}
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			var all []manifest
			for _, f := range files {
				data, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				ms, err := decodeManifests(f, data)
				if err != nil {
					t.Fatal(err)
				}
				if len(ms) == 0 {
					t.Errorf("%s: no manifest", f)
				}
				all = append(all, ms...)
			}
			for _, m := range all {
				if k, ok := m.Object.(*kustomization); ok {
					for _, res := range k.Resources {
						if _, err := os.Stat(filepath.Join(dir, res)); err != nil {
							t.Errorf("%s: resource %s: %v", m.Source, res, err)
						}
					}
				}
			}
			checkWorkloads(t, all)
		})
	}
}

// checkWorkloads runs the pod checks on every Deployment and DaemonSet in ms.
// Apps without credproxy in their own pod are checked against the one
// credproxy pod in ms (the DaemonSet).
func checkWorkloads(t *testing.T, ms []manifest) []*credproxyPod {
	t.Helper()
	cms := configMaps(ms)
	var cps []*credproxyPod
	var apps []podSource
	for _, p := range podSpecs(ms) {
		if findContainer(p.spec, "credproxy") != nil {
			cps = append(cps, checkCredproxyPod(t, p.src, p.spec, cms))
		} else {
			apps = append(apps, p)
		}
	}
	if len(cps) == 0 {
		t.Fatal("no workload runs a container named credproxy")
	}
	for _, cp := range cps {
		checkApps(t, cp.src, cp.spec, cp)
	}
	for _, m := range ms {
		if ds, ok := m.Object.(*appsv1.DaemonSet); ok {
			checkDaemonSet(t, m.Source, ds)
		}
	}
	for _, cp := range cps {
		if cp.cfg.Workloads != nil {
			checkNodePlugin(t, ms, cp)
		}
	}
	for _, a := range apps {
		if len(cps) != 1 {
			t.Fatalf("%s: an app without credproxy beside it, and %d credproxy workloads to pair it with", a.src, len(cps))
		}
		checkApps(t, a.src, a.spec, cps[0])
	}
	return cps
}

type podSource struct {
	src  string
	spec *corev1.PodSpec
}

func podSpecs(ms []manifest) []podSource {
	var out []podSource
	for _, m := range ms {
		switch o := m.Object.(type) {
		case *appsv1.Deployment:
			out = append(out, podSource{m.Source + " Deployment " + m.Name, &o.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			out = append(out, podSource{m.Source + " DaemonSet " + m.Name, &o.Spec.Template.Spec})
		}
	}
	return out
}

func configMaps(ms []manifest) map[string]*corev1.ConfigMap {
	out := map[string]*corev1.ConfigMap{}
	for _, m := range ms {
		if cm, ok := m.Object.(*corev1.ConfigMap); ok {
			out[cm.Name] = cm
		}
	}
	return out
}

// findContainer looks in containers and init containers (native sidecars).
func findContainer(spec *corev1.PodSpec, name string) *corev1.Container {
	for _, cs := range [][]corev1.Container{spec.Containers, spec.InitContainers} {
		for i := range cs {
			if cs[i].Name == name {
				return &cs[i]
			}
		}
	}
	return nil
}

func findVolume(spec *corev1.PodSpec, name string) *corev1.Volume {
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	return nil
}

func under(dir, p string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// mountFor returns the mount of c that holds path p (the deepest one).
func mountFor(c *corev1.Container, p string) *corev1.VolumeMount {
	var best *corev1.VolumeMount
	for i := range c.VolumeMounts {
		vm := &c.VolumeMounts[i]
		if under(vm.MountPath, p) && (best == nil || len(vm.MountPath) > len(best.MountPath)) {
			best = vm
		}
	}
	return best
}

// fakeFieldRefs are the downward API values the tests give pods.
var fakeFieldRefs = map[string]string{
	"status.hostIP":      "10.1.2.3",
	"status.podIP":       "10.244.1.7",
	"metadata.name":      "pod-0",
	"metadata.namespace": "default",
	"spec.nodeName":      "node-0",
}

var k8sEnvRef = regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// containerEnv resolves c's environment as the kubelet would: downward API
// fields from fakeFieldRefs, Secret and ConfigMap keys as placeholders, and
// $(VAR) references to variables defined before them.
func containerEnv(t *testing.T, c *corev1.Container) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = k8sEnvRef.ReplaceAllStringFunc(e.Value, func(m string) string {
				if m == "$$" {
					return "$"
				}
				if v, ok := env[m[2:len(m)-1]]; ok {
					return v
				}
				return m
			})
		case e.ValueFrom.FieldRef != nil:
			v, ok := fakeFieldRefs[e.ValueFrom.FieldRef.FieldPath]
			if !ok {
				t.Errorf("container %s: env %s: no test value for fieldPath %s", c.Name, e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		default:
			env[e.Name] = "placeholder"
		}
	}
	return env
}

// credproxyPod is a pod running credproxy, with its config as credproxy
// itself loads it from the files the pod's volumes provide.
type credproxyPod struct {
	src     string
	spec    *corev1.PodSpec
	c       *corev1.Container
	cfgPath string
	cfg     *config.Config
}

// checkCredproxyPod materializes the credproxy container's volumes in a temp
// dir (ConfigMaps from ms with their data, other ConfigMaps and Secrets as
// placeholders for the items the volume names, projected tokens), loads
// credproxy.yaml from there with config.Parse after pointing its file paths
// into the temp dir, and requires it to be valid. Every file the config
// names must come from a volume.
func checkCredproxyPod(t *testing.T, src string, spec *corev1.PodSpec, cms map[string]*corev1.ConfigMap) *credproxyPod {
	t.Helper()
	c := findContainer(spec, "credproxy")
	cp := &credproxyPod{src: src, spec: spec, c: c}
	root := t.TempDir()
	materializeMounts(t, src, root, spec, c, cms)

	args := append(slices.Clone(c.Command), c.Args...)
	if len(args) == 0 || args[0] != "run" {
		t.Errorf("%s: credproxy args %q: want the run command first", src, args)
	}
	for i, a := range args {
		if a == "--config" && i+1 < len(args) {
			cp.cfgPath = args[i+1]
		} else if v, ok := strings.CutPrefix(a, "--config="); ok {
			cp.cfgPath = v
		}
	}
	if cp.cfgPath == "" {
		t.Fatalf("%s: credproxy args %q have no --config", src, args)
	}
	if mountFor(c, cp.cfgPath) == nil {
		t.Fatalf("%s: --config %s is on no volume", src, cp.cfgPath)
	}
	data, err := os.ReadFile(filepath.Join(root, cp.cfgPath))
	if err != nil {
		t.Fatalf("%s: --config %s is not provided by its volume: %v", src, cp.cfgPath, err)
	}

	for k, v := range containerEnv(t, c) {
		t.Setenv(k, v)
	}
	rewritten := relocateConfigPaths(t, src, data, root, c)
	cfg, err := config.Parse(rewritten, filepath.Dir(filepath.Join(root, cp.cfgPath)))
	if err != nil {
		t.Fatalf("%s: %s does not validate:\n%s", src, cp.cfgPath, strings.Join(config.Lines(err), "\n"))
	}
	cp.cfg = cfg

	if cfg.Workloads != nil {
		checkNodePluginHardening(t, src, spec, c)
	} else {
		checkHardening(t, src, spec, c)
	}
	checkProbes(t, src, c, cfg)
	checkVaultAuth(t, src, spec, c, cfg, root)
	if slices.ContainsFunc(spec.InitContainers, func(ic corev1.Container) bool { return ic.Name == "credproxy" }) {
		if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			t.Errorf("%s: credproxy is an init container without restartPolicy: Always (a native sidecar needs it)", src)
		}
	}
	return cp
}

func materializeMounts(t *testing.T, src, root string, spec *corev1.PodSpec, c *corev1.Container, cms map[string]*corev1.ConfigMap) {
	t.Helper()
	write := func(dir, rel, data string, mode os.FileMode) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
	}
	// Secrets are written owner-only: credproxy refuses a CA key others
	// can read. In the pod the kubelet writes them root-owned with the
	// volume's defaultMode (0440 under fsGroup), which credproxy accepts
	// for a root-owned file; a test cannot make root-owned files.
	const configMapMode, secretMode = 0o644, 0o600
	items := func(what string, list []corev1.KeyToPath, dir string, data map[string]string) {
		if data == nil && len(list) == 0 {
			t.Errorf("%s: %s: name the keys with items, so a missing key fails the pod visibly", src, what)
		}
		if len(list) == 0 {
			for k, v := range data {
				write(dir, k, v, configMapMode)
			}
		}
		for _, it := range list {
			v, ok := data[it.Key]
			mode := os.FileMode(configMapMode)
			switch {
			case data == nil:
				v, mode = "placeholder for "+it.Key, secretMode
			case !ok:
				t.Errorf("%s: %s has no key %s", src, what, it.Key)
			}
			write(dir, it.Path, v, mode)
		}
	}
	configMap := func(name string, list []corev1.KeyToPath, dir string) {
		var data map[string]string
		if cm, ok := cms[name]; ok {
			data = cm.Data
		}
		items("ConfigMap "+name, list, dir, data)
	}
	for _, vm := range c.VolumeMounts {
		if vm.SubPath != "" || vm.SubPathExpr != "" {
			t.Errorf("%s: mount %s uses subPath, which never sees ConfigMap or Secret updates", src, vm.Name)
		}
		dir := filepath.Join(root, vm.MountPath)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		v := findVolume(spec, vm.Name)
		switch {
		case v == nil:
			t.Errorf("%s: mount %s: no such volume", src, vm.Name)
		case v.ConfigMap != nil:
			configMap(v.ConfigMap.Name, v.ConfigMap.Items, dir)
		case v.Secret != nil:
			items("Secret "+v.Secret.SecretName, v.Secret.Items, dir, nil)
		case v.Projected != nil:
			for _, s := range v.Projected.Sources {
				switch {
				case s.ConfigMap != nil:
					configMap(s.ConfigMap.Name, s.ConfigMap.Items, dir)
				case s.Secret != nil:
					items("Secret "+s.Secret.Name, s.Secret.Items, dir, nil)
				case s.ServiceAccountToken != nil:
					write(dir, s.ServiceAccountToken.Path, "header.payload.signature", secretMode)
				case s.DownwardAPI != nil:
					for _, it := range s.DownwardAPI.Items {
						write(dir, it.Path, "placeholder", configMapMode)
					}
				default:
					t.Errorf("%s: volume %s: unexpected projected source", src, vm.Name)
				}
			}
		case v.HostPath != nil, v.EmptyDir != nil:
		default:
			t.Errorf("%s: volume %s: unexpected volume type", src, vm.Name)
		}
	}
}

// relocateConfigPaths points every absolute file path in a credproxy config
// into root, where materializeMounts put the pod's files, after checking that
// a volume provides it. Listener sockets and the audit file must be on a
// writable volume: the root filesystem is read-only.
func relocateConfigPaths(t *testing.T, src string, data []byte, root string, c *corev1.Container) []byte {
	t.Helper()
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: config: %v", src, err)
	}
	writable := func(key, p string) {
		vm := mountFor(c, p)
		switch {
		case vm == nil:
			t.Errorf("%s: config %s: %s is on no volume (the root filesystem is read-only)", src, key, p)
		case vm.ReadOnly:
			t.Errorf("%s: config %s: %s is on read-only mount %s", src, key, p, vm.Name)
		}
	}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode, yaml.SequenceNode:
			for i, ch := range n.Content {
				walk(ch, fmt.Sprintf("%s[%d]", path, i))
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				key := strings.TrimPrefix(path+"."+k.Value, ".")
				if v.Kind != yaml.ScalarNode {
					walk(v, key)
					continue
				}
				switch {
				case strings.HasSuffix(k.Value, "_file") && v.Value != "":
					if !filepath.IsAbs(v.Value) {
						t.Errorf("%s: config %s: %q: use absolute paths in a container", src, key, v.Value)
						continue
					}
					if mountFor(c, v.Value) == nil {
						t.Errorf("%s: config %s: %s is on no volume of the credproxy container", src, key, v.Value)
					}
					v.Value = filepath.Join(root, v.Value)
				case key == "audit.path" && v.Value != "-" && v.Value != "":
					writable(key, v.Value)
					v.Value = filepath.Join(root, v.Value)
				case k.Value == "listen" && strings.HasPrefix(v.Value, "unix:/"):
					writable(key, filepath.Dir(strings.TrimPrefix(v.Value, "unix:")))
				case key == "workloads.csi.state_dir":
					writable(key, v.Value)
				case key == "workloads.csi.endpoint":
					writable(key, filepath.Dir(strings.TrimPrefix(v.Value, "unix:")))
				}
			}
		}
	}
	walk(&doc, "")
	out, err := yaml.Marshal(&doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func checkHardening(t *testing.T, src string, spec *corev1.PodSpec, c *corev1.Container) {
	t.Helper()
	sc, psc := c.SecurityContext, spec.SecurityContext
	if sc == nil {
		t.Fatalf("%s: credproxy has no securityContext", src)
	}
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	isTrue := func(b *bool) bool { return b != nil && *b }
	if !isTrue(sc.RunAsNonRoot) && !isTrue(psc.RunAsNonRoot) {
		t.Errorf("%s: credproxy: runAsNonRoot is not set", src)
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 65532 {
		t.Errorf("%s: credproxy: runAsUser = %v, want 65532 (the image's user)", src, sc.RunAsUser)
	}
	if !isTrue(sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: credproxy: readOnlyRootFilesystem is not true", src)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: credproxy: allowPrivilegeEscalation is not false", src)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
		t.Errorf("%s: credproxy: capabilities must drop ALL and add none", src)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: credproxy: seccompProfile is not RuntimeDefault", src)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken is not false: credproxy needs only its Vault token", src)
	}
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().IsZero() || req.Memory().IsZero() || lim.Memory().IsZero() {
		t.Errorf("%s: credproxy: want cpu and memory requests and a memory limit, have %v / %v", src, req, lim)
	}
	if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.ContainsAny(c.Image, ":@") {
		t.Errorf("%s: credproxy image %q: pin a tag or digest", src, c.Image)
	}
}

// checkProbes requires liveness on /healthz, readiness and startup on the
// admin listener's port, and an admin listener the kubelet can reach.
func checkProbes(t *testing.T, src string, c *corev1.Container, cfg *config.Config) {
	t.Helper()
	if cfg.Admin == nil {
		t.Fatalf("%s: the config has no admin listener for the probes and metrics", src)
	}
	host, port, err := net.SplitHostPort(cfg.Admin.Listen)
	if err != nil {
		t.Fatalf("%s: admin.listen %q: %v", src, cfg.Admin.Listen, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
		t.Errorf("%s: admin.listen %s is loopback: the kubelet probes the pod IP", src, cfg.Admin.Listen)
	}
	for _, p := range []struct {
		what  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", c.StartupProbe, ""},
		{"livenessProbe", c.LivenessProbe, "/healthz"},
		{"readinessProbe", c.ReadinessProbe, "/readyz"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: credproxy has no HTTP %s", src, p.what)
			continue
		}
		g := p.probe.HTTPGet
		if p.path != "" && g.Path != p.path {
			t.Errorf("%s: %s path %s, want %s", src, p.what, g.Path, p.path)
		}
		if g.Path != "/healthz" && g.Path != "/readyz" {
			t.Errorf("%s: %s path %s is neither /healthz nor /readyz", src, p.what, g.Path)
		}
		probePort := g.Port.String()
		for _, cport := range c.Ports {
			if cport.Name == probePort {
				probePort = fmt.Sprint(cport.ContainerPort)
			}
		}
		if probePort != port {
			t.Errorf("%s: %s port %s, but admin.listen is %s", src, p.what, g.Port.String(), cfg.Admin.Listen)
		}
	}
}

// checkVaultAuth requires Kubernetes and JWT auth to read a projected service
// account token with an audience of its own.
func checkVaultAuth(t *testing.T, src string, spec *corev1.PodSpec, c *corev1.Container, cfg *config.Config, root string) {
	t.Helper()
	if cfg.Vault == nil {
		return
	}
	a := cfg.Vault.Auth
	if a.Method != "kubernetes" && a.Method != "jwt" {
		return
	}
	jwt := strings.TrimPrefix(a.JWTFile, root)
	vm := mountFor(c, jwt)
	if vm == nil {
		t.Fatalf("%s: vault.auth.jwt_file %s is on no volume", src, jwt)
	}
	v := findVolume(spec, vm.Name)
	rel := strings.TrimPrefix(strings.TrimPrefix(jwt, vm.MountPath), "/")
	if v == nil || v.Projected == nil {
		t.Fatalf("%s: vault.auth.jwt_file %s is not on a projected volume", src, jwt)
	}
	for _, s := range v.Projected.Sources {
		if tok := s.ServiceAccountToken; tok != nil && tok.Path == rel {
			if tok.Audience != "vault" {
				t.Errorf("%s: the Vault token's audience is %q, want \"vault\"", src, tok.Audience)
			}
			if tok.ExpirationSeconds == nil || *tok.ExpirationSeconds > 3600 {
				t.Errorf("%s: the Vault token lives longer than an hour", src)
			}
			return
		}
	}
	t.Errorf("%s: vault.auth.jwt_file %s is not a projected serviceAccountToken", src, jwt)
}

// checkApps checks the containers of spec other than credproxy: their
// PostgreSQL and proxy settings reach cp's listeners, they trust the
// interception CA, and none of them can read its key.
func checkApps(t *testing.T, src string, spec *corev1.PodSpec, cp *credproxyPod) {
	t.Helper()
	for _, cs := range [][]corev1.Container{spec.InitContainers, spec.Containers} {
		for i := range cs {
			c := &cs[i]
			if c.Name == "credproxy" {
				continue
			}
			for _, vm := range c.VolumeMounts {
				v := findVolume(spec, vm.Name)
				if v == nil {
					t.Errorf("%s: container %s mounts missing volume %s", src, c.Name, vm.Name)
					continue
				}
				if exposesCAKey(v) {
					t.Errorf("%s: container %s can read ca-key.pem through volume %s", src, c.Name, v.Name)
				}
			}
			checkAppEnv(t, src, spec, c, cp)
		}
	}
}

func exposesCAKey(v *corev1.Volume) bool {
	hasKey := func(items []corev1.KeyToPath) bool {
		return len(items) == 0 || slices.ContainsFunc(items, func(it corev1.KeyToPath) bool { return it.Key == "ca-key.pem" })
	}
	switch {
	case v.Secret != nil:
		return hasKey(v.Secret.Items)
	case v.Projected != nil:
		for _, s := range v.Projected.Sources {
			if s.Secret != nil && hasKey(s.Secret.Items) {
				return true
			}
		}
	}
	return false
}

func checkAppEnv(t *testing.T, src string, spec *corev1.PodSpec, c *corev1.Container, cp *credproxyPod) {
	t.Helper()
	env := containerEnv(t, c)
	if host, ok := env["PGHOST"]; ok {
		port := env["PGPORT"]
		if port == "" {
			port = "5432"
		}
		var listens []string
		for _, p := range cp.cfg.Postgres {
			listens = append(listens, p.Listen)
		}
		if v := csiVolume(spec, c, host); v != nil && cp.cfg.Workloads != nil {
			// DaemonSet mode: the pod's own directory, from credproxy's
			// CSI driver, holding the socket of a postgres service.
			if v.CSI.Driver != cp.cfg.Workloads.CSI.Driver {
				t.Errorf("%s: container %s: PGHOST=%s is on CSI driver %s, credproxy's is %s", src, c.Name, host, v.CSI.Driver, cp.cfg.Workloads.CSI.Driver)
			}
			if !slices.Contains(listens, "unix:.s.PGSQL."+port) {
				t.Errorf("%s: container %s: .s.PGSQL.%s is no credproxy socket of %s (%v)", src, c.Name, port, cp.src, listens)
			}
		} else if strings.HasPrefix(host, "/") {
			// libpq: a directory holding .s.PGSQL.<port>. It must be the
			// same node file as credproxy's socket.
			appFile, err := hostFile(spec, c, host+"/.s.PGSQL."+port)
			if err != nil {
				t.Errorf("%s: container %s: PGHOST=%s: %v", src, c.Name, host, err)
			} else if !slices.ContainsFunc(cp.cfg.Postgres, func(p config.Postgres) bool {
				sock, ok := strings.CutPrefix(p.Listen, "unix:")
				f, err := hostFile(cp.spec, cp.c, sock)
				return ok && err == nil && f == appFile
			}) {
				t.Errorf("%s: container %s: %s/.s.PGSQL.%s (node file %s) is no credproxy listener of %s (%v)", src, c.Name, host, port, appFile, cp.src, listens)
			}
		} else if addr := net.JoinHostPort(host, port); !slices.Contains(listens, addr) {
			t.Errorf("%s: container %s: PGHOST:PGPORT %s is no credproxy listener of %s (%v)", src, c.Name, addr, cp.src, listens)
		}
	}
	if _, ok := env["HTTPS_PROXY"]; !ok {
		return
	}
	if cp.cfg.HTTP == nil {
		t.Fatalf("%s: container %s: HTTPS_PROXY is set but %s has no http listener", src, c.Name, cp.src)
	}
	want := "http://" + cp.cfg.HTTP.Listen
	for _, k := range []string{"HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"} {
		if env[k] != want {
			t.Errorf("%s: container %s: %s=%q, want %q", src, c.Name, k, env[k], want)
		}
	}
	if env["NO_PROXY"] == "" || env["NO_PROXY"] != env["no_proxy"] {
		t.Errorf("%s: container %s: NO_PROXY and no_proxy must be set alike", src, c.Name)
	}
	for _, k := range []string{"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"} {
		if p := env[k]; p == "" || mountFor(c, p) == nil {
			t.Errorf("%s: container %s: %s=%q is on no volume", src, c.Name, k, p)
		}
	}
}

// hostFile maps path p in container c to the node file it is, through a
// hostPath volume.
func hostFile(spec *corev1.PodSpec, c *corev1.Container, p string) (string, error) {
	vm := mountFor(c, p)
	if vm == nil {
		return "", fmt.Errorf("%s is on no volume of container %s", p, c.Name)
	}
	v := findVolume(spec, vm.Name)
	if v == nil || v.HostPath == nil {
		return "", fmt.Errorf("%s is not on a hostPath volume in container %s", p, c.Name)
	}
	return filepath.Join(v.HostPath.Path, strings.TrimPrefix(p, vm.MountPath)), nil
}

// checkDaemonSet: the socket directory is prepared for UID 65532 by an init
// container with nothing but CAP_CHOWN, and the node listeners use the host
// network.
func checkDaemonSet(t *testing.T, src string, ds *appsv1.DaemonSet) {
	t.Helper()
	spec := &ds.Spec.Template.Spec
	c := findContainer(spec, "credproxy")
	for _, e := range c.Env {
		if e.Name == "HOST_IP" && (e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "status.hostIP") {
			t.Errorf("%s: HOST_IP must come from the downward API's status.hostIP", src)
		}
	}
	if spec.HostNetwork && spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("%s: with the host network, dnsPolicy must be ClusterFirstWithHostNet to resolve Vault's Service name", src)
	}
	if ru := ds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge != nil && ru.MaxSurge.IntValue() != 0 {
		t.Errorf("%s: a surge pod could not bind the node's ports; want maxUnavailable only", src)
	}
	for _, ic := range spec.InitContainers {
		sc := ic.SecurityContext
		if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"CHOWN"}) ||
			!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("%s: init container %s: want capabilities drop ALL, add CHOWN only", src, ic.Name)
		}
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: init container %s: readOnlyRootFilesystem is not true", src, ic.Name)
		}
	}
}

// sortedKeys is for stable messages.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
