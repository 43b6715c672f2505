// Package integration runs credproxy end to end: a real PostgreSQL per test
// (integration/pgtest), the proxy in-process, and real clients (pgx, psql,
// pgbench) connecting through it without a password.
//
// TestMain adds a suite-wide check that no password of any role of any
// server the tests started ever appears in what credproxy let out: its zap
// logs, its audit log, the errors clients saw and the output of the client
// programs.
package integration

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
)

// Kinds of collected output.
const (
	kindLog    = "zap log"
	kindAudit  = "audit log"
	kindClient = "client error"
	kindOutput = "command output"
)

// leaks is the suite-wide no-leak collector.
var leaks = &collector{}

// collector holds every secret the tests handed to credproxy (or to the
// servers behind it) and every piece of output that must not contain one.
type collector struct {
	mu      sync.Mutex
	secrets []secretValue
	sources []*source
}

type secretValue struct {
	label string // says whose secret it is, never the value
	value string
}

// source is one stream of collected output.
type source struct {
	kind, where string
	buf         lockedBuffer
}

// lockedBuffer is a bytes.Buffer safe for concurrent writers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// Sync implements zapcore.WriteSyncer.
func (l *lockedBuffer) Sync() error { return nil }

func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// addSecret registers a value that must never appear in collected output.
func (c *collector) addSecret(label, value string) {
	if value == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.secrets = append(c.secrets, secretValue{label, value})
}

// addPassword registers a role's password and its MD5 password hash, which
// logs in to an md5 server as well as the password does.
func (c *collector) addPassword(label, role, password string) {
	if password == "" {
		return
	}
	c.addSecret(label+" password", password)
	sum := md5.Sum([]byte(password + role))
	c.addSecret(label+" md5 hash", hex.EncodeToString(sum[:]))
}

// stream returns a new source to write output into.
func (c *collector) stream(kind, where string) *lockedBuffer {
	s := &source{kind: kind, where: where}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sources = append(c.sources, s)
	return &s.buf
}

// add records one piece of output.
func (c *collector) add(kind, where string, data []byte) {
	_, _ = c.stream(kind, where).Write(data)
}

// findings are where secrets appeared, and how much was scanned per kind.
type findings struct {
	leaks   []string
	scanned map[string]int // kind -> bytes
	pieces  map[string]int // kind -> number of sources with data
	data    map[string][]byte
}

// scan looks for every secret in every source.
func (c *collector) scan() findings {
	c.mu.Lock()
	secrets := append([]secretValue(nil), c.secrets...)
	sources := append([]*source(nil), c.sources...)
	c.mu.Unlock()
	f := findings{scanned: map[string]int{}, pieces: map[string]int{}, data: map[string][]byte{}}
	for _, s := range sources {
		data := s.buf.Bytes()
		if len(data) == 0 {
			continue
		}
		f.scanned[s.kind] += len(data)
		f.pieces[s.kind]++
		f.data[s.kind] = append(f.data[s.kind], data...)
		lower := bytes.ToLower(data)
		for _, sec := range secrets {
			if bytes.Contains(data, []byte(sec.value)) || bytes.Contains(lower, []byte(strings.ToLower(sec.value))) {
				f.leaks = append(f.leaks, fmt.Sprintf("%s appeared in the %s of %s", sec.label, s.kind, s.where))
			}
		}
	}
	sort.Strings(f.leaks)
	return f
}

// check returns the problems with the suite's output: leaks, and too little
// output for the check to mean anything.
func (c *collector) check() (problems []string, summary string) {
	c.mu.Lock()
	nSecrets := len(c.secrets)
	c.mu.Unlock()
	f := c.scan()
	problems = append(problems, f.leaks...)
	summary = fmt.Sprintf("no-leak check: %d secret values against %d bytes of zap logs (%d proxies), %d bytes of audit logs (%d), %d bytes of client errors (%d), %d bytes of command output (%d)",
		nSecrets, f.scanned[kindLog], f.pieces[kindLog], f.scanned[kindAudit], f.pieces[kindAudit],
		f.scanned[kindClient], f.pieces[kindClient], f.scanned[kindOutput], f.pieces[kindOutput])
	if nSecrets == 0 {
		return problems, summary // no server was started (-short, or -run chose none)
	}
	// The check must be able to fail: it has to have seen the proxy's
	// debug-level logs and its audit records.
	if f.scanned[kindLog] < 1024 || !bytes.Contains(f.data[kindLog], []byte(`"session started"`)) {
		problems = append(problems, "the collector saw no (or almost no) proxy logs: is the logger wired to it?")
	}
	if !bytes.Contains(f.data[kindLog], []byte(`"level":"debug"`)) && !bytes.Contains(f.data[kindLog], []byte(`"level":"info"`)) {
		problems = append(problems, "the collector saw no debug or info log lines")
	}
	if f.scanned[kindAudit] < 256 || !bytes.Contains(f.data[kindAudit], []byte(`"event":"session_start"`)) {
		problems = append(problems, "the collector saw no (or almost no) audit records: is the audit log wired to it?")
	}
	return problems, summary
}

func TestMain(m *testing.M) {
	// Clients must get nothing from the environment: no password, and no
	// libpq defaults that would change where or how they connect.
	for _, v := range []string{"PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD",
		"PGSERVICE", "PGSERVICEFILE", "PGSSLMODE", "PGREQUIRESSL", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY",
		"PGSSLNEGOTIATION", "PGOPTIONS", "PGAPPNAME", "PGTARGETSESSIONATTRS", "PGCHANNELBINDING",
		"PGGSSENCMODE", "PGCONNECT_TIMEOUT", "PGSSLSNI"} {
		os.Unsetenv(v)
	}
	os.Setenv("PGPASSFILE", os.DevNull)

	code := m.Run()
	problems, summary := leaks.check()
	fmt.Fprintln(os.Stderr, summary)
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "FAIL: no-leak check:", p)
		}
		code = 1
	}
	os.Exit(code)
}

// TestCollectorFindsLeaks proves the collector's scan can fail: a planted
// secret in each kind of output is reported, by label, without its value.
func TestCollectorFindsLeaks(t *testing.T) {
	c := &collector{}
	c.addPassword("scram_user of TestX's server", "scram_user", "0123456789abcdef0123456789abcdef")
	c.add(kindLog, "TestX", []byte(`{"msg":"ok"}`))
	if f := c.scan(); len(f.leaks) != 0 {
		t.Fatalf("clean output: leaks = %v", f.leaks)
	}
	c.add(kindAudit, "TestY", []byte(`{"error":"bad password 0123456789ABCDEF0123456789ABCDEF"}`))
	sum := md5.Sum([]byte("0123456789abcdef0123456789abcdef" + "scram_user"))
	c.add(kindClient, "TestZ", []byte("md5"+hex.EncodeToString(sum[:])))
	f := c.scan()
	want := []string{
		"scram_user of TestX's server md5 hash appeared in the client error of TestZ",
		"scram_user of TestX's server password appeared in the audit log of TestY",
	}
	if strings.Join(f.leaks, "\n") != strings.Join(want, "\n") {
		t.Fatalf("leaks =\n%s\nwant\n%s", strings.Join(f.leaks, "\n"), strings.Join(want, "\n"))
	}
	for _, l := range f.leaks {
		if strings.Contains(l, "0123456789") {
			t.Errorf("finding %q shows the secret", l)
		}
	}
}
