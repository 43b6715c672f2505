package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestGOMAXPROCSUnderCPULimit runs the binary in a cgroup with a 0.5-CPU
// quota, as a sidecar with limits.cpu 500m: credproxy runs with
// GOMAXPROCS=1 (Go's own default would be 2) and says so at start; the
// GOMAXPROCS environment variable still wins.
func TestGOMAXPROCSUnderCPULimit(t *testing.T) {
	opsBinaryTest(t)
	cg := cpuCgroup(t, 0.5)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "credproxy.yaml")
	if err := os.WriteFile(cfg, []byte(`secrets: {db: {static: {username: app, password: not-used}}}
postgres:
  - {name: db, listen: "127.0.0.1:0", upstream: "127.0.0.1:1", credentials: db, tls: {mode: disable}}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		env      string
		want     float64
		wantFrom string
	}{
		{"", 1, "cpu_limit"},
		{"GOMAXPROCS=2", 2, "env"},
	} {
		line := startedLine(t, cg, tc.env, cfg)
		if line["gomaxprocs"] != tc.want || line["gomaxprocs_from"] != tc.wantFrom {
			t.Errorf("with %q in a 0.5-CPU cgroup: gomaxprocs %v from %v; want %v from %q (line: %v)",
				tc.env, line["gomaxprocs"], line["gomaxprocs_from"], tc.want, tc.wantFrom, line)
		}
		if tc.env == "" && line["cpu_limit"] != 0.5 {
			t.Errorf("cpu_limit %v, want 0.5", line["cpu_limit"])
		}
	}
}

// startedLine runs credproxy in cgroup cg with the extra environment
// variable env (if any), returns its "credproxy started" log line and
// stops it.
func startedLine(t *testing.T, cg, env, cfg string) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The shell joins the cgroup, then becomes credproxy: the process is
	// in it from its first instruction.
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `echo $$ > "$1/cgroup.procs" && exec "$2" run --config "$3"`,
		"sh", cg, opsBinary(t), cfg)
	for _, kv := range opsEnv() {
		if !strings.HasPrefix(kv, "GOMAXPROCS=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if env != "" {
		cmd.Env = append(cmd.Env, env)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	sc := bufio.NewScanner(stderr)
	var seen []string
	for sc.Scan() {
		seen = append(seen, sc.Text())
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) == nil && line["msg"] == "credproxy started" {
			go func() { // drain until exit
				for sc.Scan() {
				}
			}()
			return line
		}
	}
	t.Fatalf("no \"credproxy started\" line; stderr:\n%s", strings.Join(seen, "\n"))
	return nil
}

// cpuCgroup makes a cgroup with a CPU quota of cpus, removed at the end
// of the test, and returns its directory. It needs root and a cgroup v1
// cpu controller or a cgroup v2 hierarchy with the cpu controller; the
// machines credproxy's CI runs on have both.
func cpuCgroup(t *testing.T, cpus float64) string {
	t.Helper()
	name := fmt.Sprintf("credproxy-test-%d", os.Getpid())
	const period = 100000
	quota := fmt.Sprint(int(cpus * period))
	var dir string
	switch {
	case fileExists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"): // v1
		dir = filepath.Join("/sys/fs/cgroup/cpu", name)
		mkCgroup(t, dir)
		writeCgroup(t, dir, "cpu.cfs_period_us", fmt.Sprint(period))
		writeCgroup(t, dir, "cpu.cfs_quota_us", quota)
	case fileExists("/sys/fs/cgroup/cgroup.controllers"): // v2
		ctrl, _ := os.ReadFile("/sys/fs/cgroup/cgroup.controllers")
		if !strings.Contains(" "+string(ctrl)+" ", " cpu ") {
			t.Skipf("cgroup v2 without the cpu controller (%q): cannot set a CPU limit", strings.TrimSpace(string(ctrl)))
		}
		dir = filepath.Join("/sys/fs/cgroup", name)
		mkCgroup(t, dir)
		writeCgroup(t, dir, "cpu.max", quota+" "+fmt.Sprint(period))
	default:
		t.Skip("no cgroup cpu controller mounted at /sys/fs/cgroup: cannot set a CPU limit")
	}
	return dir
}

func mkCgroup(t *testing.T, dir string) {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, os.ErrPermission) || errors.Is(err, syscall.EROFS) {
			t.Skipf("cannot create a cgroup (%v): needs root and a writable cgroup hierarchy", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Its processes have exited by now; the kernel may take a moment
		// to let the group go.
		for i := 0; i < 50; i++ {
			if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("cgroup %s not removed", dir)
	})
}

func writeCgroup(t *testing.T, dir, file, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0o644); err != nil {
		t.Fatalf("set %s: %v", file, err)
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
