package deploy

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
)

// DaemonSet mode with per-pod attribution (a credproxy config with
// workloads): credproxy is its CSI driver's node plugin.

// csiVolume returns the inline CSI volume holding path p in container c.
func csiVolume(spec *corev1.PodSpec, c *corev1.Container, p string) *corev1.Volume {
	vm := mountFor(c, p)
	if vm == nil {
		return nil
	}
	v := findVolume(spec, vm.Name)
	if v == nil || v.CSI == nil {
		return nil
	}
	return v
}

// checkNodePluginHardening is checkHardening for the node plugin, which
// must be privileged and root (it mounts into the kubelet's directory with
// Bidirectional propagation and enters pods' network namespaces) and sees
// the node's processes (hostPID). The rest still holds: a read-only root
// filesystem, RuntimeDefault seccomp, no automounted token, resources, a
// pinned image; and no host network, which it does not need.
func checkNodePluginHardening(t *testing.T, src string, spec *corev1.PodSpec, c *corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	isTrue := func(b *bool) bool { return b != nil && *b }
	if sc == nil || !isTrue(sc.Privileged) || sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("%s: the node plugin must say privileged: true and runAsUser: 0 (what it needs, in writing)", src)
	}
	if sc == nil || !isTrue(sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: credproxy: readOnlyRootFilesystem is not true", src)
	}
	if !spec.HostPID {
		t.Errorf("%s: the node plugin needs hostPID for its peer check and the pods' network namespaces", src)
	}
	if spec.HostNetwork {
		t.Errorf("%s: the node plugin needs no host network: pods reach it through their own sockets and loopback", src)
	}
	if psc := spec.SecurityContext; psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile is not RuntimeDefault", src)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken is not false: only credproxy's container gets the API token", src)
	}
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().IsZero() || req.Memory().IsZero() || lim.Memory().IsZero() {
		t.Errorf("%s: credproxy: want cpu and memory requests and a memory limit", src)
	}
	if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.ContainsAny(c.Image, ":@") {
		t.Errorf("%s: credproxy image %q: pin a tag or digest", src, c.Image)
	}
	for _, other := range spec.Containers {
		if other.Name == c.Name {
			continue
		}
		if osc := other.SecurityContext; osc == nil || isTrue(osc.Privileged) || osc.AllowPrivilegeEscalation == nil ||
			*osc.AllowPrivilegeEscalation || osc.Capabilities == nil || !slices.Contains(osc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: container %s: only credproxy is privileged; drop ALL capabilities, no privilege escalation", src, other.Name)
		}
	}
}

// checkNodePlugin checks what makes the plugin work with the kubelet and
// nothing more: the CSIDriver (inline volumes only, pod info and a token
// for the config's audience, republished), node-driver-registrar pointing
// the kubelet at the config's endpoint, the kubelet's pod directory
// mounted with Bidirectional propagation, and RBAC limited to reading pods.
func checkNodePlugin(t *testing.T, ms []manifest, cp *credproxyPod) {
	t.Helper()
	w := cp.cfg.Workloads
	var driver *storagev1.CSIDriver
	var roles []*rbacv1.ClusterRole
	var ds *appsv1.DaemonSet
	for _, m := range ms {
		switch o := m.Object.(type) {
		case *storagev1.CSIDriver:
			driver = o
		case *rbacv1.ClusterRole:
			roles = append(roles, o)
		case *appsv1.DaemonSet:
			ds = o
		}
	}
	if driver == nil || ds == nil {
		t.Fatalf("%s: DaemonSet mode needs its CSIDriver and DaemonSet", cp.src)
	}
	s := driver.Spec
	isTrue := func(b *bool) bool { return b != nil && *b }
	if driver.Name != w.CSI.Driver {
		t.Errorf("CSIDriver %s, but workloads.csi.driver is %s", driver.Name, w.CSI.Driver)
	}
	if !isTrue(s.PodInfoOnMount) || !isTrue(s.RequiresRepublish) || s.AttachRequired == nil || *s.AttachRequired {
		t.Errorf("CSIDriver %s: want podInfoOnMount and requiresRepublish true, attachRequired false", driver.Name)
	}
	if !slices.Equal(s.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral}) {
		t.Errorf("CSIDriver %s: volumeLifecycleModes %v, want [Ephemeral] (a PersistentVolume could be mounted by any pod)", driver.Name, s.VolumeLifecycleModes)
	}
	if !isTrue(s.ServiceAccountTokenInSecrets) {
		t.Errorf("CSIDriver %s: want serviceAccountTokenInSecrets: true, so the token travels as a CSI secret", driver.Name)
	}
	if len(s.TokenRequests) != 1 || s.TokenRequests[0].Audience != w.CSI.Audience {
		t.Errorf("CSIDriver %s: tokenRequests %v, want one for audience %s (workloads.csi.audience)", driver.Name, s.TokenRequests, w.CSI.Audience)
	}
	spec := &ds.Spec.Template.Spec
	reg := findContainer(spec, "node-driver-registrar")
	sock := strings.TrimPrefix(w.CSI.Endpoint, "unix:")
	if reg == nil {
		t.Fatalf("%s: no node-driver-registrar container", cp.src)
	}
	want := "--kubelet-registration-path=/var/lib/kubelet/plugins/" + w.CSI.Driver + "/csi.sock"
	if !slices.Contains(reg.Args, "--csi-address="+sock) || !slices.Contains(reg.Args, want) {
		t.Errorf("%s: node-driver-registrar args %v: want --csi-address=%s and %s", cp.src, reg.Args, sock, want)
	}
	if hostFileOf(spec, reg, sock) != hostFileOf(spec, cp.c, sock) || hostFileOf(spec, cp.c, sock) != "/var/lib/kubelet/plugins/"+w.CSI.Driver+"/csi.sock" {
		t.Errorf("%s: the plugin socket %s is not the node file the kubelet is told", cp.src, sock)
	}
	pods := mountFor(cp.c, "/var/lib/kubelet/pods")
	if pods == nil || pods.MountPropagation == nil || *pods.MountPropagation != corev1.MountPropagationBidirectional ||
		hostFileOf(spec, cp.c, "/var/lib/kubelet/pods") != "/var/lib/kubelet/pods" {
		t.Errorf("%s: the kubelet's /var/lib/kubelet/pods must be mounted at the same path with Bidirectional propagation", cp.src)
	}
	if hostFileOf(spec, cp.c, w.CSI.StateDir) == "" {
		t.Errorf("%s: workloads.csi.state_dir %s is not on a hostPath (the pods' bind mounts point into it)", cp.src, w.CSI.StateDir)
	}
	if len(roles) != 1 {
		t.Fatalf("%s: want one ClusterRole, have %d", cp.src, len(roles))
	}
	for _, r := range roles[0].Rules {
		if !slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.Resources, []string{"pods"}) ||
			!slices.Equal(r.Verbs, []string{"get", "list", "watch"}) || len(r.ResourceNames) > 0 {
			t.Errorf("ClusterRole %s: rule %+v: the plugin only reads pods (no serviceaccounts/token, no nodes/proxy)", roles[0].Name, r)
		}
	}
}

// hostFileOf maps path p in container c to its node file through a
// hostPath volume; "" if it is on none.
func hostFileOf(spec *corev1.PodSpec, c *corev1.Container, p string) string {
	f, err := hostFile(spec, c, p)
	if err != nil {
		return ""
	}
	return f
}
