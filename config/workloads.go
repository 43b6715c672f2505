package config

import (
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Workloads is DaemonSet mode's policy: which pods on the node may use
// which services, and as whom credproxy logs in to Vault for them. With a
// workloads block every postgres service is served on each pod's own
// socket (and the HTTP proxy inside each pod's network namespace), never
// on a node-wide listener. Absent: the services listen where their
// listen keys say, for whoever connects (the sidecar and single-tenant
// modes).
type Workloads struct {
	// Attribution is how a connection is tied to a pod: csi (a socket
	// per pod, published by credproxy's CSI node plugin).
	Attribution string `yaml:"attribution"`
	// NodeName is the node credproxy runs on (the downward API's
	// spec.nodeName): pods published for any other node are refused.
	NodeName string `yaml:"node_name"`
	// PeerCheck checks the process behind each connection on a pod's
	// socket against the pod's cgroup: auto (default: where credproxy
	// sees the host's processes, hostPID), required (refuse every
	// connection when it cannot check), off.
	PeerCheck string         `yaml:"peer_check"`
	CSI       WorkloadsCSI   `yaml:"csi"`
	HTTP      WorkloadsHTTP  `yaml:"http"`
	Rules     []WorkloadRule `yaml:"rules"`
}

// WorkloadsCSI configures the CSI node plugin.
type WorkloadsCSI struct {
	// Endpoint is the plugin's gRPC socket, which the kubelet (through
	// node-driver-registrar) calls: unix:/csi/csi.sock by default.
	Endpoint string `yaml:"endpoint"`
	// Driver is the CSIDriver's name (default csi.credproxy.io).
	Driver string `yaml:"driver"`
	// Audience is the audience of the pod's token the kubelet mints
	// (CSIDriver spec.tokenRequests), which the Vault role expects
	// (default credproxy).
	Audience string `yaml:"audience"`
	// StateDir holds one directory per pod with its sockets, bind-mounted
	// into the pod (default /run/credproxy/pods).
	StateDir string `yaml:"state_dir"`
}

// WorkloadsHTTP is the HTTP proxy's per-pod listener.
type WorkloadsHTTP struct {
	// Netns: bind http.listen inside each pod's network namespace
	// (default true when an http block is configured). Needs hostPID to
	// find the namespace from the pod's processes.
	Netns *bool `yaml:"netns"`
}

// WorkloadRule allows one service account what it lists.
type WorkloadRule struct {
	Match     WorkloadMatch      `yaml:"match"`
	VaultAuth *WorkloadVaultAuth `yaml:"vault_auth"`
	// Allow lists postgres service names and http route hosts.
	Allow []string `yaml:"allow"`
}

// WorkloadMatch names a service account. Only attributes a pod cannot
// change about itself are matched: never labels or annotations.
type WorkloadMatch struct {
	Namespace      string `yaml:"namespace"`
	ServiceAccount string `yaml:"service_account"`
}

// WorkloadVaultAuth is how credproxy logs in to Vault as the workload,
// with the pod's own token: kubernetes (default) or jwt.
type WorkloadVaultAuth struct {
	Method string `yaml:"method"`
	Role   string `yaml:"role"`
	Mount  string `yaml:"mount"`
}

// Workloads defaults.
const (
	AttributionCSI          = "csi"
	DefaultCSIEndpoint      = "unix:/csi/csi.sock"
	DefaultCSIDriver        = "csi.credproxy.io"
	DefaultCSIAudience      = "credproxy"
	DefaultWorkloadStateDir = "/run/credproxy/pods"
	DefaultWorkloadSocket   = "unix:.s.PGSQL.5432"
	PeerCheckAuto           = "auto"
	PeerCheckRequired       = "required"
	PeerCheckOff            = "off"
)

var (
	attributions = []string{AttributionCSI}
	peerChecks   = []string{PeerCheckAuto, PeerCheckRequired, PeerCheckOff}
	workloadAuth = []string{"kubernetes", "jwt"}
	// dnsLabel is a namespace or service account name (RFC 1123).
	dnsLabel     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	socketName   = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
)

// HTTPNetns reports whether the HTTP proxy listens in each pod's
// network namespace.
func (w *Workloads) HTTPNetns() bool { return w.HTTP.Netns == nil || *w.HTTP.Netns }

// Rule returns the rule for a service account, or nil: default deny.
func (w *Workloads) Rule(namespace, serviceAccount string) *WorkloadRule {
	for i := range w.Rules {
		m := w.Rules[i].Match
		if m.Namespace == namespace && m.ServiceAccount == serviceAccount {
			return &w.Rules[i]
		}
	}
	return nil
}

// Allows reports whether the rule lists service (a postgres name or an
// http route host).
func (r *WorkloadRule) Allows(service string) bool {
	return r != nil && slices.Contains(r.Allow, service)
}

// WorkloadSocket is a postgres service's socket file name in a pod's
// directory (listen: unix:NAME under workloads).
func WorkloadSocket(listen string) string {
	return strings.TrimPrefix(listen, "unix:")
}

func (c *Config) applyWorkloadDefaults() {
	w := c.Workloads
	if w == nil {
		return
	}
	if w.PeerCheck == "" {
		w.PeerCheck = PeerCheckAuto
	}
	if w.CSI.Endpoint == "" {
		w.CSI.Endpoint = DefaultCSIEndpoint
	}
	if w.CSI.Driver == "" {
		w.CSI.Driver = DefaultCSIDriver
	}
	if w.CSI.Audience == "" {
		w.CSI.Audience = DefaultCSIAudience
	}
	if w.CSI.StateDir == "" {
		w.CSI.StateDir = DefaultWorkloadStateDir
	}
	for i := range w.Rules {
		if a := w.Rules[i].VaultAuth; a != nil {
			if a.Method == "" {
				a.Method = "kubernetes"
			}
			if a.Mount == "" {
				a.Mount = a.Method
			}
		}
	}
	for i := range c.Postgres {
		p := &c.Postgres[i]
		if p.Listen == "" {
			p.Listen = DefaultWorkloadSocket
		}
		if p.SocketMode == "" {
			p.SocketMode = DefaultSocketMode
		}
	}
}

// checkWorkloadListen is postgres[i].listen under workloads: unix:NAME, a
// file name in each pod's directory.
func checkWorkloadListen(addr string) string {
	name, ok := strings.CutPrefix(addr, "unix:")
	if !ok || !socketName.MatchString(name) || name == "." || name == ".." {
		return fmt.Sprintf("%q: with workloads, each pod gets the service on its own socket: "+
			"listen names the socket file in the pod's directory, e.g. unix:.s.PGSQL.5432", addr)
	}
	return ""
}

func (c *Config) validateWorkloads(v *validator) {
	w := c.Workloads
	if w == nil {
		return
	}
	const p = "workloads"
	if v.required(p+".attribution", w.Attribution) {
		v.oneOf(p+".attribution", w.Attribution, attributions)
	}
	if v.required(p+".node_name", w.NodeName) && !dnsSubdomain.MatchString(w.NodeName) {
		v.add(p+".node_name", "%q is not a node name", w.NodeName)
	}
	v.oneOf(p+".peer_check", w.PeerCheck, peerChecks)
	if path, ok := strings.CutPrefix(w.CSI.Endpoint, "unix:"); !ok || !filepath.IsAbs(path) {
		v.add(p+".csi.endpoint", "%q must be unix:/absolute/path", w.CSI.Endpoint)
	}
	if !dnsSubdomain.MatchString(w.CSI.Driver) {
		v.add(p+".csi.driver", "%q is not a CSI driver name (a DNS subdomain such as csi.credproxy.io)", w.CSI.Driver)
	}
	if strings.TrimSpace(w.CSI.Audience) == "" {
		v.add(p+".csi.audience", "must not be empty")
	}
	if !filepath.IsAbs(w.CSI.StateDir) {
		v.add(p+".csi.state_dir", "%q must be an absolute path", w.CSI.StateDir)
	}
	if c.HTTP != nil && w.HTTPNetns() && !isLoopbackListen(c.HTTP.Listen) {
		v.add("http.listen", "%q: with workloads the HTTP proxy listens inside each pod's network namespace, "+
			"where only loopback is the pod's own; use 127.0.0.1:PORT", c.HTTP.Listen)
	}

	services := map[string]bool{}
	for _, pg := range c.Postgres {
		services[pg.Name] = true
	}
	if c.HTTP != nil {
		for _, r := range c.HTTP.Routes {
			services[r.Host] = true
		}
	}
	seen := map[WorkloadMatch]int{}
	for i, r := range w.Rules {
		rp := fmt.Sprintf("%s.rules[%d]", p, i)
		m := r.Match
		if v.required(rp+".match.namespace", m.Namespace) && !dnsLabel.MatchString(m.Namespace) {
			v.add(rp+".match.namespace", "%q is not a namespace name", m.Namespace)
		}
		if v.required(rp+".match.service_account", m.ServiceAccount) && !dnsSubdomain.MatchString(m.ServiceAccount) {
			v.add(rp+".match.service_account", "%q is not a service account name", m.ServiceAccount)
		}
		if j, dup := seen[m]; dup {
			v.add(rp+".match", "namespace %q, service_account %q is already matched by rules[%d]", m.Namespace, m.ServiceAccount, j)
		} else {
			seen[m] = i
		}
		if len(r.Allow) == 0 {
			v.add(rp+".allow", "must list at least one postgres service or http route host")
		}
		needsVault := false
		for j, s := range r.Allow {
			ap := fmt.Sprintf("%s.allow[%d]", rp, j)
			if !services[s] {
				v.add(ap, "%q is neither a postgres service name nor an http route host", s)
				continue
			}
			if c.usesVault(s) {
				needsVault = true
			}
		}
		a := r.VaultAuth
		if a == nil {
			if needsVault {
				v.add(rp+".vault_auth", "required: the services it allows use vault secrets, which credproxy reads as the workload")
			}
			continue
		}
		v.oneOf(rp+".vault_auth.method", a.Method, workloadAuth)
		v.required(rp+".vault_auth.role", a.Role)
		if c.Vault == nil {
			v.add("vault", "required by %s.vault_auth (the address to log in at)", rp)
		}
	}
	if len(w.Rules) == 0 {
		v.warn(p+".rules", "no rules: every pod is refused (default deny)")
	}
}

// usesVault reports whether a postgres service or http route host reads a
// vault secret.
func (c *Config) usesVault(service string) bool {
	uses := func(secret string) bool { s, ok := c.Secrets[secret]; return ok && s.Vault != nil }
	for _, pg := range c.Postgres {
		if pg.Name == service && uses(pg.Credentials) {
			return true
		}
	}
	if c.HTTP != nil {
		for _, r := range c.HTTP.Routes {
			if r.Host == service && uses(r.Credentials) {
				return true
			}
		}
	}
	return false
}
