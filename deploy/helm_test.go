package deploy

import (
	"os"
	"path"
	"slices"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

const chartDir = "helm/credproxy"

// testKubeVersion is the oldest Kubernetes with native sidecars on by default.
var testKubeVersion = chartutil.KubeVersion{Version: "v1.29.0", Major: "1", Minor: "29"}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	if chrt.Schema == nil {
		t.Fatal("the chart has no values.schema.json")
	}
	return chrt
}

// renderChart renders the chart as `helm template demo --namespace apps` with
// the given values (YAML) over values.yaml. ToRenderValues validates the
// values against values.schema.json; the engine runs in strict mode, so a
// template that reads a value missing from values.yaml fails.
func renderChart(t *testing.T, chrt *chart.Chart, valuesYAML string) (map[string]string, error) {
	t.Helper()
	vals, err := chartutil.ReadValues([]byte(valuesYAML))
	if err != nil {
		t.Fatalf("values: %v", err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = testKubeVersion
	opts := chartutil.ReleaseOptions{Name: "demo", Namespace: "apps", Revision: 1, IsInstall: true}
	rv, err := chartutil.ToRenderValues(chrt, vals, opts, caps)
	if err != nil {
		return nil, err
	}
	return engine.Engine{Strict: true}.Render(chrt, rv)
}

// decodeRendered decodes every rendered manifest strictly; NOTES.txt is
// returned apart.
func decodeRendered(t *testing.T, out map[string]string) ([]manifest, string) {
	t.Helper()
	var ms []manifest
	var notes string
	names := sortedKeys(out)
	for _, name := range names {
		switch {
		case path.Base(name) == "NOTES.txt":
			notes = out[name]
			continue
		case !strings.HasSuffix(name, ".yaml"):
			t.Errorf("unexpected template output %s", name)
			continue
		}
		got, err := decodeManifests(name, []byte(out[name]))
		if err != nil {
			t.Fatalf("%v\n--- %s ---\n%s", err, name, out[name])
		}
		ms = append(ms, got...)
	}
	return ms, notes
}

func kindsOf(ms []manifest) []string {
	var ks []string
	for _, m := range ms {
		ks = append(ks, m.Kind)
	}
	sort.Strings(ks)
	return ks
}

// helmNodePluginKinds is what the chart renders in daemonset mode.
var helmNodePluginKinds = []string{"CSIDriver", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Service", "ServiceAccount"}

// helmValueSet is one tested set of values: the chart renders wantKinds
// with them, and the API server takes what it renders (cluster_test.go).
type helmValueSet struct {
	name      string
	values    string
	wantKinds []string
	// serviceAccount is one the values name and say exists already
	// (serviceAccount.create: false): the cluster tests create it first.
	serviceAccount string
}

const helmHTTPOn = `
http:
  enabled: true
  port: 8118
  caSecret: credproxy-ca
  routes:
    - host: api.github.com
      credentials: github
      inject:
        header: {name: Authorization, value: "Bearer {{ .token }}"}
secrets:
  app-db:
    vault: {path: database/creds/app-readonly}
  github:
    vault: {path: secret/data/app/github, field_map: {token: token}}
`

var helmValueSets = []helmValueSet{
	{
		name:      "sidecar defaults",
		values:    "",
		wantKinds: []string{"ConfigMap", "Deployment", "ServiceAccount"},
	},
	{
		name:      "sidecar with http proxy and PodMonitor",
		values:    helmHTTPOn + "podMonitor: {enabled: true}\n",
		wantKinds: []string{"ConfigMap", "Deployment", "PodMonitor", "ServiceAccount"},
	},
	{
		name:      "sidecar without example app",
		values:    "app: {enabled: false}\n",
		wantKinds: []string{"ConfigMap", "ServiceAccount"},
	},
	{
		name:      "daemonset defaults",
		values:    "mode: daemonset\n",
		wantKinds: helmNodePluginKinds,
	},
	{
		name: "daemonset with the http proxy, two rules",
		values: "mode: daemonset\n" + helmHTTPOn + `
daemonset:
  rules:
    - match: {namespace: production, service_account: app}
      vault_auth: {role: app}
      allow: [appdb, api.github.com]
    - match: {namespace: reports, service_account: reporter}
      vault_auth: {method: jwt, role: reporter, mount: jwt-k8s}
      allow: [appdb]
`,
		wantKinds: helmNodePluginKinds,
	},
	{
		name:      "daemonset with only the http proxy, peer check auto, no metrics Service",
		values:    "mode: daemonset\n" + helmHTTPOn + "postgres: []\ndaemonset: {peerCheck: auto, metricsService: false, rules: [{match: {namespace: web, service_account: frontend}, vault_auth: {role: web}, allow: [api.github.com]}]}\n",
		wantKinds: []string{"CSIDriver", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"},
	},
	{
		name: "approle auth, image digest, existing service account",
		values: `
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
serviceAccount: {create: false, name: app}
vault:
  address: https://vault.example.com:8200
  ca_file: /etc/credproxy/files/vault-ca.pem
  auth: {method: approle, secretName: credproxy-approle}
files:
  - {path: db-ca.pem, configMap: credproxy-upstream-ca, key: db-ca.pem}
  - {path: vault-ca.pem, secret: vault-tls, key: ca.crt}
`,
		wantKinds:      []string{"ConfigMap", "Deployment"},
		serviceAccount: "app",
	},
	{
		name: "token auth, two databases (one pooled), watch off",
		values: `
watch: false
vault:
  address: http://vault.vault.svc:8200
  auth: {method: token, secretName: credproxy-vault-token}
postgres:
  - {name: appdb, upstream: db-a.db.svc:5432, credentials: app-db, tls: {mode: verify-full, ca_file: /etc/credproxy/files/db-ca.pem}}
  - {name: reports, port: 5433, upstream: db-b.db.svc, database: reports, credentials: app-db, connect_timeout: 5s,
     pool: {max_server_connections: 10, idle_timeout: 30s}}
`,
		wantKinds: []string{"ConfigMap", "Deployment", "ServiceAccount"},
	},
}

// TestHelmChart renders the chart in both modes and with each optional part
// on, decodes everything strictly, and checks the pods as the plain manifests
// are checked: credproxy's config validates against the files the volumes
// provide, the pod is hardened and probed, the apps reach the listeners.
func TestHelmChart(t *testing.T) {
	chrt := loadChart(t)
	for _, tt := range helmValueSets {
		t.Run(tt.name, func(t *testing.T) {
			out, err := renderChart(t, chrt, tt.values)
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			ms, notes := decodeRendered(t, out)
			if got := kindsOf(ms); strings.Join(got, ",") != strings.Join(tt.wantKinds, ",") {
				t.Fatalf("rendered kinds %v, want %v", got, tt.wantKinds)
			}
			if strings.TrimSpace(notes) == "" {
				t.Error("NOTES.txt rendered empty")
			}
			for _, m := range ms {
				if m.Name == "" {
					t.Errorf("%s: %s without a name", m.Source, m.Kind)
				}
			}
			if len(podSpecs(ms)) > 0 {
				checkWorkloads(t, ms)
			}
			// The fragment NOTES.txt prints for your own workloads is a
			// pod spec that passes the same checks: beside credproxy
			// (sidecar), or as an app pod of the node's credproxy.
			checkPodSpecFragment(t, ms, notes)
		})
	}
}

// checkPodSpecFragment decodes the pod-spec fragment in NOTES.txt strictly
// and checks it as a pod next to the rendered ConfigMap.
func checkPodSpecFragment(t *testing.T, ms []manifest, notes string) {
	t.Helper()
	doc := notesDeployment(t, notes)
	got, err := decodeManifests("NOTES.txt pod spec", []byte(doc))
	if err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
	dep := got[0].Object.(*appsv1.Deployment)
	app := findContainer(&dep.Spec.Template.Spec, "app")
	if app == nil || len(app.Env) == 0 {
		t.Fatal("the pod spec fragment gives the app container no environment")
	}
	// Fill in what the user's container has, so the fragment is a pod.
	app.Image = "registry.example.com/app:1.0"
	var with []manifest
	for _, m := range ms {
		switch m.Object.(type) {
		case *corev1.ConfigMap:
			with = append(with, m)
		case *appsv1.DaemonSet:
			// Daemonset mode: the app pairs with the node's credproxy.
			with = ms
		}
	}
	checkWorkloads(t, append(slices.Clone(with), got...))
}

// notesDeployment returns the pod-spec fragment NOTES.txt prints, as the
// pod template of a Deployment "yours".
func notesDeployment(t *testing.T, notes string) string {
	t.Helper()
	_, rest, ok := strings.Cut(notes, "# --- begin pod spec ---\n")
	fragment, _, ok2 := strings.Cut(rest, "# --- end pod spec ---")
	if !ok || !ok2 {
		t.Fatalf("NOTES.txt has no pod spec fragment:\n%s", notes)
	}
	return "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: yours}\nspec:\n  selector: {matchLabels: {app: yours}}\n  template:\n    metadata: {labels: {app: yours}}\n    spec:\n" +
		indent(fragment, "      ")
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		if l != "" {
			lines[i] = prefix + l
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// TestHelmValuesSchemaRejects: values.schema.json turns mistakes into errors
// at install time instead of a pod that fails to start.
func TestHelmValuesSchemaRejects(t *testing.T) {
	chrt := loadChart(t)
	tests := []struct {
		name, values string
	}{
		{"unknown mode", "mode: bogus\n"},
		{"unknown top-level key", "replicas: 3\n"},
		{"misspelt nested key", "vault: {adress: https://vault:8200}\n"},
		{"listen is the chart's", "postgres: [{name: a, listen: 127.0.0.1:5432, upstream: db:5432, credentials: c}]\n"},
		{"bad postgres name", "postgres: [{name: 'a b', upstream: db:5432, credentials: c}]\n"},
		{"postgres without upstream", "postgres: [{name: a, credentials: c}]\n"},
		{"bad tls mode", "postgres: [{name: a, upstream: db:5432, credentials: c, tls: {mode: prefer}}]\n"},
		{"port out of range", "admin: {port: 70000}\n"},
		{"bad duration", "shutdownGrace: 30 seconds\n"},
		{"secret with two sources", "secrets: {a: {vault: {path: x}, env: {password: PW}}}\n"},
		{"secret with no source", "secrets: {a: {}}\n"},
		{"vault secret without path", "secrets: {a: {vault: {}}}\n"},
		{"unknown auth method", "vault: {auth: {method: ldap}}\n"},
		{"approle without secretName", "vault: {auth: {method: approle}}\n"},
		{"kubernetes without role", "vault: {auth: {method: kubernetes, role: ''}}\n"},
		{"short token lifetime", "vault: {auth: {tokenExpirationSeconds: 60}}\n"},
		{"vault address not a URL", "vault: {address: vault:8200}\n"},
		{"route with two injections", "http: {routes: [{host: a.example.com, credentials: c, inject: {header: {name: A, value: b}, query: {name: k, value: v}}}]}\n"},
		{"route without injection", "http: {routes: [{host: a.example.com, credentials: c, inject: {}}]}\n"},
		{"bad http default", "http: {default: allow}\n"},
		{"file from configMap and secret", "files: [{path: a.pem, key: a.pem, configMap: a, secret: b}]\n"},
		{"file escaping its directory", "files: [{path: ../a.pem, key: a.pem, configMap: a}]\n"},
		{"relative config file path", "vault: {ca_file: vault-ca.pem}\n"},
		{"bad log level", "logLevel: trace\n"},
		{"bad image digest", "image: {digest: latest}\n"},
		{"env var without name", "env: [{value: x}]\n"},
		{"daemonset rule matching labels", "daemonset: {rules: [{match: {namespace: a, labels: {app: x}}, allow: [appdb]}]}\n"},
		{"daemonset rule without service account", "daemonset: {rules: [{match: {namespace: a}, allow: [appdb]}]}\n"},
		{"daemonset rule allowing nothing", "daemonset: {rules: [{match: {namespace: a, service_account: b}, allow: []}]}\n"},
		{"daemonset rule with approle", "daemonset: {rules: [{match: {namespace: a, service_account: b}, vault_auth: {method: approle, role: r}, allow: [appdb]}]}\n"},
		{"bad CSI driver name", "daemonset: {driver: CSI_Credproxy}\n"},
		{"bad peer check", "daemonset: {peerCheck: sometimes}\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := renderChart(t, chrt, tt.values)
			if err == nil {
				t.Fatalf("values %q rendered; want a schema error", tt.values)
			}
			if !strings.Contains(err.Error(), "schema") {
				t.Fatalf("values %q: error %v is not from the schema", tt.values, err)
			}
		})
	}
}

// TestHelmChartFails: combinations the schema cannot express fail the render
// with a message saying what to do.
func TestHelmChartFails(t *testing.T) {
	chrt := loadChart(t)
	tests := []struct {
		name, values, want string
	}{
		{"nothing to proxy", "postgres: []\n", "at least one postgres entry"},
		{"daemonset without rules", "mode: daemonset\ndaemonset: {rules: []}\n", "at least one in daemonset.rules"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := renderChart(t, chrt, tt.values)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("render error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestHelmLint runs `helm lint --strict`'s checks on both modes.
func TestHelmLint(t *testing.T) {
	for _, mode := range []string{"sidecar", "daemonset"} {
		t.Run(mode, func(t *testing.T) {
			linter := lint.AllWithKubeVersion(chartDir, map[string]any{"mode": mode}, "apps", &testKubeVersion)
			for _, m := range linter.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				}
			}
		})
	}
}

// TestHelmChartKubeVersion: native sidecars need 1.29.
func TestHelmChartKubeVersion(t *testing.T) {
	chrt := loadChart(t)
	for v, want := range map[string]bool{"v1.28.9": false, "v1.29.0": true, "v1.33.1": true, "v1.34.0-eks-1": true} {
		if got := chartutil.IsCompatibleRange(chrt.Metadata.KubeVersion, v); got != want {
			t.Errorf("kubeVersion %q accepts %s: %v, want %v", chrt.Metadata.KubeVersion, v, got, want)
		}
	}
}

// TestHelmReadmeValues: the values file deploy/README.md shows renders in
// both modes and passes the pod checks.
func TestHelmReadmeValues(t *testing.T) {
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(data), "cat > app-values.yaml <<'EOF'\n")
	values, _, ok2 := strings.Cut(rest, "\nEOF\n")
	if !ok || !ok2 {
		t.Fatal("README.md has no app-values.yaml example")
	}
	chrt := loadChart(t)
	for _, mode := range []string{"sidecar", "daemonset"} {
		t.Run(mode, func(t *testing.T) {
			out, err := renderChart(t, chrt, values+"\nmode: "+mode+"\n")
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			ms, _ := decodeRendered(t, out)
			checkWorkloads(t, ms)
		})
	}
}
