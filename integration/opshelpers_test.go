package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/credproxy/credproxy/proxy/audit"
)

// --- the credproxy binary ---------------------------------------------------

// opsBin is the credproxy binary the ops tests run. It is built once for
// all the tests that hold it at the same time and removed when the last of
// them ends (the package's TestMain is not ours to extend).
var opsBin struct {
	mu   sync.Mutex
	dir  string
	path string
	refs int
}

// opsBinary builds ./cmd/credproxy (with -race when the tests run
// with it) unless a test still holds a build, and returns its path.
func opsBinary(t *testing.T) string {
	t.Helper()
	opsBin.mu.Lock()
	defer opsBin.mu.Unlock()
	if opsBin.path == "" {
		goTool, err := exec.LookPath("go")
		if err != nil {
			t.Fatalf("the go tool is needed to build credproxy: %v", err)
		}
		dir, err := os.MkdirTemp("", "credproxy-ops-bin-")
		if err != nil {
			t.Fatal(err)
		}
		bin := filepath.Join(dir, "credproxy")
		args := []string{"build", "-o", bin}
		if opsRace {
			args = append(args, "-race")
		}
		args = append(args, "github.com/credproxy/credproxy/cmd/credproxy")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		start := time.Now()
		out, err := exec.CommandContext(ctx, goTool, args...).CombinedOutput()
		if err != nil {
			os.RemoveAll(dir)
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("built credproxy (race %v) in %v", opsRace, time.Since(start).Round(time.Millisecond))
		opsBin.dir, opsBin.path = dir, bin
	}
	opsBin.refs++
	t.Cleanup(func() {
		opsBin.mu.Lock()
		defer opsBin.mu.Unlock()
		if opsBin.refs--; opsBin.refs == 0 {
			os.RemoveAll(opsBin.dir)
			opsBin.dir, opsBin.path = "", ""
		}
	})
	return opsBin.path
}

// opsBinaryTest begins a test that runs the credproxy binary: it skips
// under -short and takes hold of the binary before t.Parallel, so that
// every such test holds it before any of them resumes and it is built once.
func opsBinaryTest(t *testing.T) {
	t.Helper()
	skipShort(t)
	opsBinary(t)
	t.Parallel()
}

// opsRunCLI runs the credproxy binary to completion (at most 30s) and returns
// its exit code, stdout and stderr, which go to the no-leak collector.
func opsRunCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, opsBinary(t), args...)
	cmd.Env = opsEnv()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	leaks.add(kindOutput, t.Name()+": credproxy "+strings.Join(args, " "), append(out.Bytes(), errb.Bytes()...))
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("credproxy %s: %v", strings.Join(args, " "), err)
	}
	if strings.Contains(errb.String(), "WARNING: DATA RACE") {
		t.Errorf("credproxy %s reported a data race:\n%s", strings.Join(args, " "), errb.String())
	}
	return code, out.String(), errb.String()
}

// opsEnv is the environment for credproxy processes: ours without
// CREDPROXY_CONFIG and VAULT_TOKEN, so that only what a test gives counts.
func opsEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CREDPROXY_CONFIG=") && !strings.HasPrefix(kv, "VAULT_TOKEN=") && !strings.HasPrefix(kv, "GORACE=") {
			env = append(env, kv)
		}
	}
	// A -race binary sleeps 1s on a clean exit by default; the tests
	// time exits.
	return append(env, strings.TrimSpace("GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0"))
}

// --- a credproxy process ------------------------------------------------------

// opsProc is one `credproxy run` process with its config in a temp dir.
type opsProc struct {
	t       *testing.T
	dir     string // holds credproxy.yaml, audit.jsonl and whatever the test adds
	cfgPath string
	// addrs are free loopback addresses by name; "admin" is the admin
	// listener. render reads them when it writes the config.
	addrs  map[string]string
	render func(p *opsProc) string
	// wrap, if set, runs the binary under a command (prlimit …, which execs
	// it in place, so the pid is credproxy's).
	wrap []string

	cmd    *exec.Cmd
	stderr *lockedBuffer
	done   chan struct{} // closed once the process has been reaped
	code   int           // exit code, valid after done; -1 when killed by a signal
	exited time.Time
}

// newOpsProc prepares a process in a fresh temp dir: render writes its
// config, reading p.addr for listen addresses.
func newOpsProc(t *testing.T, render func(p *opsProc) string) *opsProc {
	t.Helper()
	dir := t.TempDir()
	return &opsProc{t: t, dir: dir, cfgPath: filepath.Join(dir, "credproxy.yaml"), addrs: map[string]string{}, render: render}
}

// addr is the free loopback address given to name (picked on first use).
func (p *opsProc) addr(name string) string {
	if a, ok := p.addrs[name]; ok {
		return a
	}
	a := opsFreeAddr(p.t)
	p.addrs[name] = a
	return a
}

// path is a file in the process's dir.
func (p *opsProc) path(name string) string { return filepath.Join(p.dir, name) }

// adminURL is the admin server's base URL.
func (p *opsProc) adminURL() string { return "http://" + p.addr("admin") }

// writeConfig renders the config and replaces the file atomically.
func (p *opsProc) writeConfig() {
	p.t.Helper()
	opsWriteAtomic(p.t, p.cfgPath, []byte(p.render(p)))
}

// start writes the config, runs `credproxy run --config FILE args...` and
// waits until /readyz answers 200. A listen address taken meanwhile by
// someone else is retried with new addresses.
func (p *opsProc) start(args ...string) {
	p.t.Helper()
	bin := opsBinary(p.t)
	for attempt := 1; ; attempt++ {
		p.writeConfig()
		p.launch(bin, args...)
		err := p.waitReady(30 * time.Second)
		if err == nil {
			return
		}
		if attempt < 3 && p.hasExited() && strings.Contains(string(p.stderr.Bytes()), "address already in use") {
			p.t.Logf("a listen address was taken; retrying with new ones")
			p.addrs = map[string]string{}
			continue
		}
		p.t.Fatalf("credproxy did not become ready: %v\n--- credproxy stderr ---\n%s", err, tail(p.stderr.Bytes(), 40))
	}
}

// launch starts the process; its stderr goes to the no-leak collector.
func (p *opsProc) launch(bin string, args ...string) {
	p.t.Helper()
	argv := append(append(append([]string(nil), p.wrap...), bin, "run", "--config", p.cfgPath), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = p.dir
	cmd.Env = opsEnv()
	// Brought down with us if the test binary dies without its Cleanups.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.stderr = leaks.stream(kindLog, p.t.Name()+": credproxy process")
	cmd.Stderr = p.stderr
	stdout := leaks.stream(kindOutput, p.t.Name()+": credproxy stdout")
	cmd.Stdout = stdout
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start credproxy: %v", err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() { // reaped here; awaited by wait and the Cleanup below
		err := cmd.Wait()
		p.exited = time.Now()
		p.code = cmd.ProcessState.ExitCode()
		if err != nil && p.code == 0 {
			p.code = -1
		}
		close(p.done)
	}()
	t := p.t
	done := p.done
	t.Cleanup(func() {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill() // our child, by its pid
			<-done
		}
		if data, err := os.ReadFile(filepath.Join(p.dir, "audit.jsonl")); err == nil {
			leaks.add(kindAudit, t.Name()+": credproxy process", data)
		}
		if strings.Contains(string(p.stderr.Bytes()), "WARNING: DATA RACE") {
			t.Errorf("the credproxy process reported a data race:\n%s", p.stderr.Bytes())
		}
		if t.Failed() {
			t.Logf("--- credproxy stderr ---\n%s", tail(p.stderr.Bytes(), 60))
		}
	})
}

func (p *opsProc) hasExited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitReady polls /readyz until 200, the process exits, or d passes.
func (p *opsProc) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	var last string
	for {
		if p.hasExited() {
			return fmt.Errorf("credproxy exited with code %d", p.code)
		}
		code, body, err := opsGet(p.adminURL() + "/readyz")
		if err == nil && code == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("%d %q %v", code, body, err)
		if time.Now().After(deadline) {
			return fmt.Errorf("/readyz not 200 after %v; last answer: %s", d, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// signal sends sig to the process.
func (p *opsProc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("send %v to credproxy: %v", sig, err)
	}
}

// wait waits up to d for the process to exit and returns its exit code;
// ok is false when it is still running.
func (p *opsProc) wait(d time.Duration) (code int, ok bool) {
	select {
	case <-p.done:
		return p.code, true
	case <-time.After(d):
		return 0, false
	}
}

// metrics scrapes and parses /metrics.
func (p *opsProc) metrics() opsMetricSet {
	p.t.Helper()
	return opsScrape(p.t, p.adminURL())
}

// logLines parses every stderr line so far as JSON; a line that is not
// JSON fails the test.
func (p *opsProc) logLines() []opsLogLine {
	p.t.Helper()
	return opsParseLogs(p.t, p.stderr.Bytes())
}

// waitLog waits up to 10s for the n-th (1-based) stderr line whose msg
// contains msg, and returns it.
func (p *opsProc) waitLog(msg string, n int) opsLogLine {
	p.t.Helper()
	var found []opsLogLine
	opsWaitFor(p.t, 10*time.Second, fmt.Sprintf("log line %d with %q", n, msg), func() error {
		found = found[:0]
		for _, l := range p.logLines() {
			if strings.Contains(l.Msg(), msg) {
				found = append(found, l)
			}
		}
		if len(found) < n {
			return fmt.Errorf("%d such lines", len(found))
		}
		return nil
	})
	return found[n-1]
}

// auditRecords reads the process's audit log so far.
func (p *opsProc) auditRecords() []audit.Record {
	p.t.Helper()
	data, err := os.ReadFile(p.path("audit.jsonl"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		p.t.Fatalf("read audit log: %v", err)
	}
	return opsParseAudit(p.t, data)
}

func opsParseAudit(t *testing.T, data []byte) []audit.Record {
	t.Helper()
	var recs []audit.Record
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

// --- logs -------------------------------------------------------------------

// opsLogLine is one zap JSON line.
type opsLogLine map[string]any

func (l opsLogLine) Msg() string   { s, _ := l["msg"].(string); return s }
func (l opsLogLine) Level() string { s, _ := l["level"].(string); return s }
func (l opsLogLine) Str(k string) string {
	s, _ := l[k].(string)
	return s
}

func opsParseLogs(t *testing.T, data []byte) []opsLogLine {
	t.Helper()
	var out []opsLogLine
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var l opsLogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			if bytes.Contains(data, []byte("WARNING: DATA RACE")) {
				continue // the race detector's report, which the Cleanup fails the test with
			}
			t.Fatalf("stderr line is not JSON: %q: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

// --- admin endpoints ---------------------------------------------------------

var opsHTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// opsGet returns the status and body of GET url.
func opsGet(url string) (int, string, error) {
	resp, err := opsHTTP.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, string(body), err
}

// opsMetricSet is a parsed /metrics page and its text.
type opsMetricSet struct {
	fams map[string]*dto.MetricFamily
	text string
}

// opsScrape GETs base+/metrics, parses it with expfmt and hands the
// text to the no-leak collector.
func opsScrape(t *testing.T, base string) opsMetricSet {
	t.Helper()
	code, body, err := opsGet(base + "/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	leaks.add(kindOutput, t.Name()+": /metrics", []byte(body))
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return opsMetricSet{fams: fams, text: body}
}

// opsLabelsMatch reports whether m has every label in want.
func opsLabelsMatch(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, lp := range m.GetLabel() {
		have[lp.GetName()] = lp.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

// value sums the series of a counter or gauge named name whose labels
// include want; found is false when none opsLabelsMatch.
func (s opsMetricSet) value(name string, want map[string]string) (v float64, found bool) {
	f, ok := s.fams[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if !opsLabelsMatch(m, want) {
			continue
		}
		found = true
		switch {
		case m.Counter != nil:
			v += m.GetCounter().GetValue()
		case m.Gauge != nil:
			v += m.GetGauge().GetValue()
		case m.Untyped != nil:
			v += m.GetUntyped().GetValue()
		}
	}
	return v, found
}

// count sums the observation counts of a histogram's series.
func (s opsMetricSet) count(name string, want map[string]string) (n uint64, found bool) {
	f, ok := s.fams[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if m.Histogram != nil && opsLabelsMatch(m, want) {
			found = true
			n += m.GetHistogram().GetSampleCount()
		}
	}
	return n, found
}

// labelValues lists every label value on the page, as "family{name=value}".
func (s opsMetricSet) labelValues() []string {
	var out []string
	for name, f := range s.fams {
		for _, m := range f.GetMetric() {
			for _, lp := range m.GetLabel() {
				out = append(out, fmt.Sprintf("%s{%s=%q}", name, lp.GetName(), lp.GetValue()))
			}
		}
	}
	sort.Strings(out)
	return out
}

// --- files --------------------------------------------------------------------

// opsWriteAtomic replaces path with data as config management does: a temp
// file in the same directory, then a rename.
func opsWriteAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o600)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		t.Fatalf("write %s: %v", path, err)
	}
}

// opsK8sDir is a directory laid out as the kubelet lays out a mounted
// Secret or ConfigMap: dir/..<timestamp>/KEY holds the data, dir/..data is
// a symlink to the current timestamp dir and dir/KEY a symlink to
// ..data/KEY. An update writes a new timestamp dir and swaps ..data
// atomically with a rename.
type opsK8sDir struct {
	dir     string
	current string // name of the timestamp dir ..data points to
	n       int
}

func newOpsK8sDir(t *testing.T, dir string, files map[string]string) *opsK8sDir {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k := &opsK8sDir{dir: dir}
	k.update(t, files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

// update writes files into a new timestamp dir and swaps ..data to it.
func (k *opsK8sDir) update(t *testing.T, files map[string]string) {
	t.Helper()
	k.n++
	ts := fmt.Sprintf("..2024_06_0%d_12_00_00.%09d", k.n, time.Now().Nanosecond())
	if err := os.Mkdir(filepath.Join(k.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(k.dir, ts, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(k.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if k.current != "" {
		if err := os.RemoveAll(filepath.Join(k.dir, k.current)); err != nil {
			t.Fatal(err)
		}
	}
	k.current = ts
}

// --- misc -----------------------------------------------------------------------

// opsFreeAddr returns a loopback address that was free a moment ago.
func opsFreeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// opsWaitFor polls check every 25ms until it returns nil, failing the test
// with its last error after d.
func opsWaitFor(t *testing.T, d time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %v", what, d, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// opsPacedRows is a COPY text source that sends limit bytes at about rate
// bytes per second, so that a COPY is still streaming when a test acts;
// reached is closed once mark bytes have been sent.
type opsPacedRows struct {
	rowGenerator
	rate    float64
	mark    int64
	reached chan struct{}
	start   time.Time
	once    sync.Once
}

func newOpsPacedRows(limit int64, rate float64, mark int64) *opsPacedRows {
	return &opsPacedRows{rowGenerator: rowGenerator{limit: limit, sum: opsNopHash{}}, rate: rate, mark: mark, reached: make(chan struct{})}
}

func (p *opsPacedRows) Read(b []byte) (int, error) {
	if p.start.IsZero() {
		p.start = time.Now()
	}
	if len(b) > 32<<10 {
		b = b[:32<<10]
	}
	n, err := p.rowGenerator.Read(b)
	if p.n >= p.mark {
		p.once.Do(func() { close(p.reached) })
	}
	if due := p.start.Add(time.Duration(float64(p.n) / p.rate * float64(time.Second))); time.Until(due) > 0 {
		time.Sleep(time.Until(due))
	}
	return n, err
}

// opsNopHash is a hash.Hash that does nothing, for generators whose sum is not needed.
type opsNopHash struct{}

func (opsNopHash) Write(p []byte) (int, error) { return len(p), nil }
func (opsNopHash) Sum(b []byte) []byte         { return b }
func (opsNopHash) Reset()                      {}
func (opsNopHash) Size() int                   { return 0 }
func (opsNopHash) BlockSize() int              { return 1 }
