package identity

import (
	"strings"
)

// CgroupPodUID returns the UID of the pod whose cgroup a /proc/<pid>/cgroup
// file (its content) places the process in, as the kubelet names pod
// cgroups with either cgroup driver:
//
//	cgroupfs: /kubepods/burstable/pod<uid>/<container>
//	          /kubepods/pod<uid>/<container> (Guaranteed)
//	systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope
//
// Every hierarchy that names a pod must name the same one (cgroup v1 has
// one line per hierarchy, v2 one line, hybrid both). ok is false when no
// line names a pod: a host process, or one outside Kubernetes.
func CgroupPodUID(content string) (uid string, ok bool) {
	for line := range strings.SplitSeq(content, "\n") {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		u := podUIDInPath(parts[2])
		if u == "" {
			continue
		}
		if uid != "" && u != uid {
			return "", false // two pods: nothing a kubelet makes
		}
		uid = u
	}
	return uid, uid != ""
}

// podUIDInPath finds the pod component of a cgroup path below a kubepods
// component.
func podUIDInPath(path string) string {
	underKubepods := false
	for c := range strings.SplitSeq(path, "/") {
		if strings.HasPrefix(c, "kubepods") {
			underKubepods = true
		}
		if !underKubepods {
			continue
		}
		// cgroupfs
		if u, ok := strings.CutPrefix(c, "pod"); ok && isUID(u) {
			return u
		}
		// systemd: kubepods[-qos]-pod<uid_>.slice
		if rest, ok := strings.CutSuffix(c, ".slice"); ok {
			if i := strings.LastIndex(rest, "-pod"); i >= 0 && strings.HasPrefix(rest, "kubepods") {
				u := strings.ReplaceAll(rest[i+len("-pod"):], "_", "-")
				if isUID(u) {
					return u
				}
			}
		}
	}
	return ""
}

// isUID reports whether s looks like a Kubernetes UID (a UUID in its
// 8-4-4-4-12 hex form).
func isUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
				return false
			}
		}
	}
	return true
}

// PodCgroupName is the cgroup directory name the kubelet gives a pod with
// the systemd driver under QoS class qos ("" for Guaranteed, burstable,
// besteffort), or with the cgroupfs driver when systemd is false. For
// tests and the documentation of what CgroupPodUID matches.
func PodCgroupName(uid, qos string, systemd bool) string {
	if !systemd {
		return "pod" + uid
	}
	prefix := "kubepods-"
	if qos != "" {
		prefix += qos + "-"
	}
	return prefix + "pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
}
