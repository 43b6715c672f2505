// Package nodetest fakes the parts of a Kubernetes node a DaemonSet
// credproxy looks at, for tests run as root: pod cgroups named as the
// kubelet names them (cgroup v2), processes placed in them, and pod
// network namespaces (ip netns) joined to the host by veth pairs.
// Everything a test creates is removed by its Cleanup.
package nodetest

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy/identity"
)

// RequireRoot skips the test unless it runs as root on Linux.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates cgroups and network namespaces")
	}
}

// Cgroup2Root is where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
func Cgroup2Root(t testing.TB) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ... mount-point ... - fstype source options
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				return fields[4]
			}
		}
	}
	t.Skip("no cgroup v2 hierarchy mounted")
	return ""
}

// Pod is a fake pod on the node: a cgroup named as the kubelet's systemd
// driver names a BestEffort pod's, and optionally a network namespace.
type Pod struct {
	UID    string
	Cgroup string // the cgroup directory
	Netns  string // the ip netns name; "" for none
	// IP is the pod's address on its veth, HostIP the host end's.
	IP, HostIP string
	veth       string
}

// NewUID returns a random Kubernetes-style UID.
func NewUID(t testing.TB) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// NewPod creates pod uid's cgroup under a kubepods.slice of the test's
// own below the cgroup v2 root.
func NewPod(t testing.TB, uid string) *Pod {
	t.Helper()
	root := filepath.Join(Cgroup2Root(t), "credproxy-test-"+uid[:8], "kubepods.slice", "kubepods-besteffort.slice")
	dir := filepath.Join(root, identity.PodCgroupName(uid, "besteffort", true), "cri-containerd-app.scope")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("nodetest: create cgroup: %v", err)
	}
	top := filepath.Join(Cgroup2Root(t), "credproxy-test-"+uid[:8])
	t.Cleanup(func() { removeCgroups(t, top) })
	return &Pod{UID: uid, Cgroup: dir}
}

// removeCgroups removes a cgroup tree bottom-up, killing what is left in it.
func removeCgroups(t testing.TB, top string) {
	var dirs []string
	_ = filepath.Walk(top, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if data, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
			for _, f := range strings.Fields(string(data)) {
				var pid int
				if _, err := fmt.Sscan(f, &pid); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		for range 50 {
			if err := os.Remove(dirs[i]); err == nil || os.IsNotExist(err) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Command returns cmd set up to start inside the pod's cgroup (clone3
// CLONE_INTO_CGROUP) and, with a network namespace, inside it. The
// caller starts it; the cgroup's Cleanup kills it if it still runs.
func (p *Pod) Command(t testing.TB, name string, args ...string) *exec.Cmd {
	t.Helper()
	if p.Netns != "" {
		args = append([]string{"netns", "exec", p.Netns, name}, args...)
		name = "ip"
	}
	cmd := exec.Command(name, args...)
	fd, err := syscall.Open(p.Cgroup, syscall.O_DIRECTORY|syscall.O_RDONLY, 0)
	if err != nil {
		t.Fatalf("nodetest: open cgroup: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	return cmd
}

// Sandbox starts a long-lived process in the pod (its "pause"
// container), which gives the pod's network namespace a process.
func (p *Pod) Sandbox(t testing.TB) *exec.Cmd {
	t.Helper()
	cmd := p.Command(t, "sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatalf("nodetest: start the sandbox: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

var netnsSeq int

// AddNetns gives the pod a network namespace with loopback up and a veth
// pair to the host: the pod end gets 10.77.<n>.2/24, the host end
// 10.77.<n>.1/24. Only addresses inside namespaces the test made.
func (p *Pod) AddNetns(t testing.TB) {
	t.Helper()
	netnsSeq++
	n := netnsSeq
	p.Netns = fmt.Sprintf("cptest-%s", p.UID[:8])
	p.veth = fmt.Sprintf("cpv%s", p.UID[:8])
	p.HostIP, p.IP = fmt.Sprintf("10.77.%d.1", n), fmt.Sprintf("10.77.%d.2", n)
	Run(t, "ip", "netns", "add", p.Netns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", p.Netns).Run() })
	Run(t, "ip", "link", "add", p.veth, "type", "veth", "peer", "name", p.veth+"p")
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", p.veth).Run() })
	Run(t, "ip", "link", "set", p.veth+"p", "netns", p.Netns)
	Run(t, "ip", "addr", "add", p.HostIP+"/24", "dev", p.veth)
	Run(t, "ip", "link", "set", p.veth, "up")
	Run(t, "ip", "netns", "exec", p.Netns, "ip", "link", "set", "lo", "up")
	Run(t, "ip", "netns", "exec", p.Netns, "ip", "addr", "add", p.IP+"/24", "dev", p.veth+"p")
	Run(t, "ip", "netns", "exec", p.Netns, "ip", "link", "set", p.veth+"p", "up")
	Run(t, "ip", "netns", "exec", p.Netns, "ip", "route", "add", "default", "via", p.HostIP)
}

// NetnsFile opens the pod's network namespace.
func (p *Pod) NetnsFile(t testing.TB) *os.File {
	t.Helper()
	f, err := os.Open(filepath.Join("/run/netns", p.Netns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Run runs a command, failing the test with its output on error.
func Run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("nodetest: %s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
