package httpproxy

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestInitCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new")
	var out bytes.Buffer
	if err := InitCA(dir, &out); err != nil {
		t.Fatal(err)
	}
	for name, mode := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %o, want %o", name, fi.Mode().Perm(), mode)
		}
	}
	ca, err := LoadCA(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	pub, ok := ca.cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() || !ca.cert.IsCA || !ca.cert.MaxPathLenZero {
		t.Errorf("CA key %T IsCA=%v", ca.cert.PublicKey, ca.cert.IsCA)
	}
	for _, want := range []string{"SSL_CERT_FILE=", "REQUESTS_CA_BUNDLE=", "NODE_EXTRA_CA_CERTS=", "update-ca-certificates", "--cacert"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("instructions lack %q", want)
		}
	}
	if err := InitCA(dir, &out); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("second InitCA: %v", err)
	}
}

func TestLoadCARejects(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	for _, d := range []string{a, b} {
		if err := InitCA(d, &bytes.Buffer{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := LoadCA(filepath.Join(a, CACertFile), filepath.Join(b, CAKeyFile)); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("mismatched key: %v", err)
	}
	// A leaf is not a CA.
	pki := newTestPKI(t)
	leaf := pki.serverCert(t, "x.test")
	leafFile := filepath.Join(t.TempDir(), "leaf.pem")
	os.WriteFile(leafFile, pemCert(leaf.Certificate[0]), 0o600)
	if _, err := LoadCA(leafFile, filepath.Join(a, CAKeyFile)); err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Errorf("leaf as CA: %v", err)
	}
	if _, err := LoadCA(filepath.Join(a, "missing.pem"), filepath.Join(a, CAKeyFile)); err == nil {
		t.Error("missing file")
	}
}
