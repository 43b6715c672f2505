package kubetest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// process is one run of etcd or kube-apiserver; done closes once it has
// been reaped.
type process struct {
	name    string
	cmd     *exec.Cmd
	logFile string
	done    chan struct{}
	err     error // Wait's result, valid after done
}

// launch starts bin with args, its output appended to logFile. The child
// gets SIGKILL if the test binary dies without running its Cleanups (e.g.
// on -timeout), so no daemon outlives the test run.
func launch(name, bin, dir, logFile string, args []string) (*process, error) {
	logf, err := os.OpenFile(logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logFile: logFile, done: make(chan struct{})}
	go func() { // reaped here, awaited by stop
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitFor polls ready every interval until it returns nil, the process
// exits, or timeout passes; the error then carries ready's last error.
func (p *process) waitFor(timeout time.Duration, ready func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	const interval = 100 * time.Millisecond
	for {
		attemptCtx, attemptCancel := context.WithTimeout(ctx, 5*time.Second)
		err := ready(attemptCtx)
		attemptCancel()
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited: %v", p.name, p.err)
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %v: %w", p.name, timeout, err)
		case <-time.After(interval):
		}
	}
}

// stop sends SIGTERM, then SIGKILL to the process group if the process has
// not exited after grace.
func (p *process) stop(t testing.TB, grace time.Duration) {
	if p == nil || p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM) // fails only if it has exited meanwhile
	select {
	case <-p.done:
		return
	case <-time.After(grace):
		t.Logf("kubetest: %s pid %d still running %v after SIGTERM; killing it", p.name, p.cmd.Process.Pid, grace)
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Errorf("kubetest: %s pid %d did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// logTail returns the last lines of the process's log, from offset on.
func (p *process) logTail(offset int64) string {
	const maxLines, maxBytes = 60, 24 << 10
	data, _ := os.ReadFile(p.logFile)
	if offset > int64(len(data)) {
		offset = 0
	}
	data = data[offset:]
	if len(data) > maxBytes {
		data = data[len(data)-maxBytes:]
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return "--- tail of " + p.logFile + " ---\n" + strings.Join(lines, "\n")
}

// portTaken reports whether the log, from offset on, says a listener could
// not bind: the free port was taken between FreePort and the bind.
func portTaken(logFile string, offset int64) bool {
	data, _ := os.ReadFile(logFile)
	if offset > int64(len(data)) {
		return false
	}
	return bytes.Contains(data[offset:], []byte("address already in use"))
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
