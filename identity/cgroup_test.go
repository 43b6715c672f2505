package identity

import "testing"

func TestCgroupPodUID(t *testing.T) {
	const uid = "0b9c6f2e-1d2a-4c3b-9e8f-7a6b5c4d3e2f"
	const other = "11111111-2222-3333-4444-555555555555"
	sysd := "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b9c6f2e_1d2a_4c3b_9e8f_7a6b5c4d3e2f.slice/cri-containerd-abc.scope\n"
	tests := []struct {
		name, content, want string
		ok                  bool
	}{
		{"systemd burstable (cgroup v2)", sysd, uid, true},
		{"systemd guaranteed", "0::/kubepods.slice/kubepods-pod0b9c6f2e_1d2a_4c3b_9e8f_7a6b5c4d3e2f.slice/cri-containerd-abc.scope\n", uid, true},
		{"cgroupfs besteffort (v1 lines)", "12:memory:/kubepods/besteffort/pod" + uid + "/abc\n11:cpu:/kubepods/besteffort/pod" + uid + "/abc\n", uid, true},
		{"cgroupfs guaranteed", "0::/kubepods/pod" + uid + "/abc\n", uid, true},
		{"hybrid: v1 root, v2 in the pod", "4:memory:/\n" + sysd, uid, true},
		{"inside a cgroup namespace", "0::/../../kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b9c6f2e_1d2a_4c3b_9e8f_7a6b5c4d3e2f.slice/x.scope\n", uid, true},
		{"host process", "0::/system.slice/sshd.service\n", "", false},
		{"pod-like name outside kubepods", "0::/system.slice/pod" + uid + "\n", "", false},
		{"two pods", "1:cpu:/kubepods/pod" + uid + "/a\n0::/kubepods/pod" + other + "/b\n", "", false},
		{"not a UID", "0::/kubepods/podnot-a-uid/a\n", "", false},
		{"empty", "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := CgroupPodUID(tt.content)
			if got != tt.want || ok != tt.ok {
				t.Errorf("CgroupPodUID = %q, %v; want %q, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
	if PodCgroupName(uid, "", false) != "pod"+uid {
		t.Errorf("cgroupfs name %q", PodCgroupName(uid, "", false))
	}
}
