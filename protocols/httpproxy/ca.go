package httpproxy

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// File names InitCA writes and the config's http.ca usually points at.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// caValidity is how long a CA made by InitCA is valid.
const caValidity = 10 * 365 * 24 * time.Hour

// CA signs interception certificates: http.ca's certificate and key.
type CA struct {
	cert     *x509.Certificate
	key      crypto.Signer
	chainPEM []byte // every certificate in cert_file, appended to each leaf
}

// Certificate is the CA's certificate.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// fingerprint is the hex SHA-256 of the CA certificate.
func (c *CA) fingerprint() string {
	sum := sha256.Sum256(c.cert.Raw)
	return hex.EncodeToString(sum[:])
}

// LoadCA reads a CA certificate (PEM; the first certificate is the signer,
// any that follow are its chain) and its private key (PEM: PKCS#8, SEC 1
// EC or PKCS#1 RSA). The certificate must be a CA allowed to sign
// certificates, currently valid, and match the key. Every error starts
// with the key path of the file at fault (http.ca.cert_file: …).
func LoadCA(certFile, keyFile string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("http.ca.cert_file: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("http.ca.key_file: %w", err)
	}
	return parseCA(certPEM, keyPEM)
}

func parseCA(certPEM, keyPEM []byte) (*CA, error) {
	var certs []*x509.Certificate
	var chain bytes.Buffer
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("http.ca.cert_file: %w", err)
		}
		certs = append(certs, c)
		_ = pem.Encode(&chain, b)
	}
	if len(certs) == 0 {
		return nil, errors.New("http.ca.cert_file: no PEM CERTIFICATE block")
	}
	cert := certs[0]
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, errors.New("http.ca.cert_file: the certificate is not a CA (basicConstraints CA:TRUE); create one with `credproxy ca init`")
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("http.ca.cert_file: the CA certificate may not sign certificates (keyUsage lacks keyCertSign)")
	}
	if now := time.Now(); now.After(cert.NotAfter) || now.Before(cert.NotBefore) {
		return nil, fmt.Errorf("http.ca.cert_file: the CA certificate is not valid now (valid %s to %s)",
			cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("http.ca.key_file: %w", err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, errors.New("http.ca.key_file: does not match the certificate in http.ca.cert_file")
	}
	return &CA{cert: cert, key: key, chainPEM: chain.Bytes()}, nil
}

func parseKey(keyPEM []byte) (crypto.Signer, error) {
	for rest := keyPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, errors.New("no PEM private key block")
		}
		var k any
		var err error
		switch b.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", b.Type, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported key type %T", k)
		}
		return s, nil
	}
}

// InitCA writes a fresh ECDSA P-256 CA to dir: ca.pem (mode 0644) and
// ca-key.pem (mode 0600), creating dir (0700) if needed, and tells w how
// to make apps trust it. It refuses to overwrite an existing CA: apps
// already trust that one.
func InitCA(dir string, w io.Writer) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s already exists: apps may trust it; remove it first or choose another --out", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	certPEM, keyPEM, err := newCA(time.Now())
	if err != nil {
		return err
	}
	// The key first, exclusively and private from the start.
	if err := writeExclusive(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeExclusive(certPath, certPEM, 0o644); err != nil {
		_ = os.Remove(keyPath)
		return err
	}
	abs, err := filepath.Abs(certPath)
	if err != nil {
		abs = certPath
	}
	_, err = fmt.Fprintf(w, trustInstructions, certPath, keyPath, abs)
	return err
}

const trustInstructions = `Wrote %s (the CA certificate) and %s (its private key, mode 0600).
Point http.ca at them; keep the key readable by credproxy only.

Apps that use credproxy as HTTPS_PROXY must trust the certificate:

  export SSL_CERT_FILE=%[3]s        # OpenSSL-based clients: curl, Python ssl/urllib, Ruby, Go on Linux
  export REQUESTS_CA_BUNDLE=%[3]s   # Python requests
  export NODE_EXTRA_CA_CERTS=%[3]s  # Node.js (added to its built-in roots)
  curl --cacert %[3]s ...

SSL_CERT_FILE and REQUESTS_CA_BUNDLE replace the default roots; to keep
public CAs trusted too, point them at a bundle with both, e.g.
  cat /etc/ssl/certs/ca-certificates.crt %[3]s > bundle.pem

Or add it to the system store:
  Debian/Ubuntu: sudo cp %[3]s /usr/local/share/ca-certificates/credproxy.crt && sudo update-ca-certificates
  RHEL/Fedora:   sudo cp %[3]s /etc/pki/ca-trust/source/anchors/credproxy.pem && sudo update-ca-trust
  macOS:         sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain %[3]s
  Alpine:        cp %[3]s /usr/local/share/ca-certificates/credproxy.crt && update-ca-certificates
`

// newCA makes a self-signed ECDSA P-256 CA that may sign leaf
// certificates only (path length 0).
func newCA(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	ski := sha256.Sum256(pubDER)
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"credproxy"},
			CommonName:   fmt.Sprintf("credproxy interception CA %s %s", host, serial.Text(16)[:8]),
		},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		SubjectKeyId:          ski[:20],
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// randomSerial is a positive 128-bit serial number.
func randomSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	return n.Add(n, big.NewInt(1)), nil
}

func writeExclusive(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	// The umask may have narrowed mode; make it exact.
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
