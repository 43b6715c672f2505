package httpproxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"io/fs"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func testCA(t *testing.T) *CA {
	t.Helper()
	dir := t.TempDir()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadCA(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func allowHosts(hosts ...string) func(string) bool {
	return func(h string) bool {
		for _, x := range hosts {
			if x == h {
				return true
			}
		}
		return false
	}
}

func TestCertIssuedOnceAndVerifies(t *testing.T) {
	ca := testCA(t)
	m := newCertManager(ca, allowHosts("api.test", "10.1.2.3"), certOptions{}, zap.NewNop())
	defer m.stop()
	var wg sync.WaitGroup
	certs := make([]*tls.Certificate, 32)
	for i := range certs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := m.get(context.Background(), "api.test")
			if err != nil {
				t.Error(err)
			}
			certs[i] = c
		}()
	}
	wg.Wait()
	if n := m.issued(); n != 1 {
		t.Fatalf("%d certificates signed for one host, want 1", n)
	}
	leaf := certs[0].Leaf
	for _, c := range certs {
		if c == nil || c.Leaf.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
			t.Fatal("callers got different certificates")
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "api.test", Roots: pool}); err != nil {
		t.Errorf("leaf does not verify: %v", err)
	}
	if _, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("leaf key %T, want ECDSA", leaf.PublicKey)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life > defaultCertValidity+notBeforeSkew+time.Minute {
		t.Errorf("lifetime %s", life)
	}
	if leaf.IsCA || len(leaf.DNSNames) != 1 {
		t.Errorf("leaf IsCA=%v names=%v", leaf.IsCA, leaf.DNSNames)
	}
	// An IP host gets an IP SAN.
	c, err := m.get(context.Background(), "10.1.2.3")
	if err != nil || len(c.Leaf.IPAddresses) != 1 || len(c.Leaf.DNSNames) != 0 {
		t.Errorf("IP cert: %v %v", c, err)
	}
	// Later callers hit the cache.
	if _, err := m.get(context.Background(), "api.test"); err != nil || m.issued() != 2 {
		t.Errorf("cached get: issued=%d err=%v", m.issued(), err)
	}
}

func TestCertRefusedForUnroutedHost(t *testing.T) {
	m := newCertManager(testCA(t), allowHosts("api.test"), certOptions{}, zap.NewNop())
	defer m.stop()
	if _, err := m.get(context.Background(), "evil.test"); err == nil {
		t.Fatal("issued a certificate for a host no route names")
	}
	if m.issued() != 0 {
		t.Error("signed something")
	}
}

// Under testing/synctest: certmagic's maintenance runs on the bubble's
// clock, so a busy machine cannot make it late.
func TestCertRenewedBeforeExpiry(t *testing.T) {
	ca := testCA(t)
	synctest.Test(t, func(t *testing.T) {
		m := newCertManager(ca, allowHosts("api.test"),
			certOptions{validity: 3 * time.Second, renewInterval: 100 * time.Millisecond}, zap.NewNop())
		defer m.stop()
		first, err := m.get(context.Background(), "api.test")
		if err != nil {
			t.Fatal(err)
		}
		deadline := first.Leaf.NotAfter
		for time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
			synctest.Wait()
			if c := m.cached("api.test"); c != nil && c.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) != 0 {
				if !c.Leaf.NotAfter.After(first.Leaf.NotAfter) {
					t.Errorf("renewed certificate expires %s, before the old one (%s)", c.Leaf.NotAfter, first.Leaf.NotAfter)
				}
				return
			}
		}
		t.Fatalf("not renewed before expiry (issued %d)", m.issued())
	})
}

// A certificate maintenance did not renew in time is replaced on the next
// handshake, not served expired.
func TestCertExpiredIsReplaced(t *testing.T) {
	m := newCertManager(testCA(t), allowHosts("api.test"), certOptions{validity: 1500 * time.Millisecond, renewInterval: time.Hour}, zap.NewNop())
	defer m.stop()
	c1, err := m.get(context.Background(), "api.test")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(c1.Leaf.NotAfter) + 10*time.Millisecond)
	c2, err := m.get(context.Background(), "api.test")
	if err != nil {
		t.Fatal(err)
	}
	if c2.Leaf.SerialNumber.Cmp(c1.Leaf.SerialNumber) == 0 || !time.Now().Before(c2.Leaf.NotAfter) {
		t.Errorf("served the expired certificate (issued %d)", m.issued())
	}
	if n := len(m.cache.AllMatchingCertificates("api.test")); n != 1 {
		t.Errorf("%d certificates cached for the host, want the new one only", n)
	}
}

func TestIssuerRejectsBadCSR(t *testing.T) {
	iss := &caIssuer{ca: testCA(t), validity: time.Hour, allow: allowHosts("a.test", "b.test"), log: zap.NewNop()}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, names := range [][]string{{"a.test", "b.test"}, {"evil.test"}, {}} {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: names}, key)
		if err != nil {
			t.Fatal(err)
		}
		csr, _ := x509.ParseCertificateRequest(der)
		if _, err := iss.Issue(context.Background(), csr); err == nil {
			t.Errorf("issued for %v", names)
		}
	}
}

func TestMemStorage(t *testing.T) {
	ctx := context.Background()
	s := newMemStorage()
	if _, err := s.Load(ctx, "a/b"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load missing: %v", err)
	}
	for _, k := range []string{"certs/x/a.crt", "certs/x/a.key", "certs/y/b.crt", "top"} {
		if err := s.Store(ctx, k, []byte(k)); err != nil {
			t.Fatal(err)
		}
	}
	if !s.Exists(ctx, "certs/x") || s.Exists(ctx, "certs/z") {
		t.Error("Exists on directories")
	}
	if l, _ := s.List(ctx, "certs", false); len(l) != 2 || l[0] != "certs/x" || l[1] != "certs/y" {
		t.Errorf("List = %v", l)
	}
	if l, _ := s.List(ctx, "certs", true); len(l) != 3 {
		t.Errorf("List recursive = %v", l)
	}
	if ki, err := s.Stat(ctx, "certs/x/a.crt"); err != nil || !ki.IsTerminal || ki.Size != int64(len("certs/x/a.crt")) {
		t.Errorf("Stat = %+v %v", ki, err)
	}
	if err := s.Delete(ctx, "certs/x"); err != nil || s.Exists(ctx, "certs/x/a.crt") || !s.Exists(ctx, "certs/y/b.crt") {
		t.Error("Delete directory")
	}
	// Locks exclude, and honour the context.
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := s.Lock(short, "l"); err == nil {
		t.Error("second Lock succeeded")
	}
	got := make(chan error, 1)
	go func() { got <- s.Lock(ctx, "l") }()
	time.Sleep(20 * time.Millisecond)
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Errorf("Lock after Unlock: %v", err)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Error(err)
	}
	if err := s.Unlock(ctx, "l"); err == nil {
		t.Error("Unlock of an unlocked name succeeded")
	}
}

func TestCertHostsBounded(t *testing.T) {
	m := newCertManager(testCA(t), func(string) bool { return true }, certOptions{maxHosts: 3}, zap.NewNop())
	defer m.stop()
	ctx := context.Background()
	for _, h := range []string{"a.test", "b.test", "c.test", "d.test", "e.test"} {
		if _, err := m.get(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(m.cache.AllMatchingCertificates("a.test")) + len(m.cache.AllMatchingCertificates("b.test")); n != 0 {
		t.Errorf("oldest hosts still cached (%d)", n)
	}
	if m.magic.Storage.Exists(ctx, certmagic.StorageKeys.CertsSitePrefix(m.issuer.IssuerKey(), "a.test")) {
		t.Error("oldest host still in storage")
	}
	if m.cached("e.test") == nil || m.cached("c.test") == nil {
		t.Error("newest hosts not cached")
	}
	// A dropped host that comes back gets a new certificate.
	if _, err := m.get(ctx, "a.test"); err != nil || m.issued() != 6 {
		t.Errorf("re-issue: issued=%d err=%v", m.issued(), err)
	}
}
