package httpproxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Interception certificates.
//
// certmagic manages them, with everything ACME turned off: an in-process
// Issuer signs with http.ca, a memory Storage holds the assets (nothing
// touches disk), and certmagic's Cache keeps the certificates in memory and
// renews them in the background before they expire. credproxy does not use
// certmagic's on-demand GetCertificate: the certificate must be for the
// CONNECT host whatever the client's SNI says, and on-demand issuance
// coordinates through package-global state shared by every Config in the
// process. Instead, certManager.get looks the CONNECT host up in the
// Cache and, on a miss, calls Config.ManageSync for it (one caller per host
// at a time), which obtains the certificate through the issuer, stores it
// and caches it as managed.
const (
	// defaultCertValidity is a leaf's lifetime.
	defaultCertValidity = 24 * time.Hour
	// renewalWindowRatio: renew when a third of the lifetime is left.
	renewalWindowRatio = 1.0 / 3
	// defaultRenewInterval is how often certmagic's maintenance looks for
	// certificates to renew.
	defaultRenewInterval = 10 * time.Minute
	// certCacheCapacity bounds memory; an evicted certificate is reloaded
	// from memory storage, not signed again.
	certCacheCapacity = 10000
	// notBeforeSkew backdates leaves for clients with slow clocks.
	notBeforeSkew = 5 * time.Minute
)

// certManager issues and caches interception certificates.
type certManager struct {
	issuer *caIssuer
	cache  *certmagic.Cache
	magic  *certmagic.Config
	log    *zap.Logger

	mu       sync.Mutex
	inflight map[string]*certCall
	// hosts are the names certmagic manages, oldest first; past maxHosts
	// the oldest is dropped (cache and storage), so a wildcard route
	// cannot make memory grow without bound.
	hosts    []string
	managed  map[string]bool
	maxHosts int
	stopOnce sync.Once
}

type certCall struct {
	done chan struct{}
	cert *tls.Certificate
	err  error
}

type certOptions struct {
	validity      time.Duration
	renewInterval time.Duration
	maxHosts      int
}

// newCertManager starts certmagic's cache maintenance; stop ends it.
// allow is asked before anything is signed.
func newCertManager(ca *CA, allow func(host string) bool, o certOptions, log *zap.Logger) *certManager {
	if o.validity <= 0 {
		o.validity = defaultCertValidity
	}
	if o.renewInterval <= 0 {
		o.renewInterval = defaultRenewInterval
	}
	if o.maxHosts <= 0 {
		o.maxHosts = certCacheCapacity
	}
	m := &certManager{log: log, inflight: make(map[string]*certCall), managed: make(map[string]bool), maxHosts: o.maxHosts}
	m.issuer = &caIssuer{ca: ca, validity: o.validity, allow: allow, log: log,
		key: "credproxy-" + ca.fingerprint()[:16]}
	// certmagic logs every lock and obtain step at info; only its
	// warnings and errors reach our log. certManager logs each issuance.
	cmLog := log.Named("certmagic").WithOptions(zap.IncreaseLevel(zapcore.WarnLevel))
	var magic atomic.Pointer[certmagic.Config]
	m.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) {
			if c := magic.Load(); c != nil {
				return c, nil
			}
			return nil, errors.New("certificate manager not ready")
		},
		RenewCheckInterval: o.renewInterval,
		OCSPCheckInterval:  24 * time.Hour, // stapling is off; nothing to check
		Capacity:           certCacheCapacity,
		Logger:             cmLog,
	})
	m.magic = certmagic.New(m.cache, certmagic.Config{
		RenewalWindowRatio:  renewalWindowRatio,
		Issuers:             []certmagic.Issuer{m.issuer},
		KeySource:           certmagic.StandardKeyGenerator{KeyType: certmagic.P256},
		Storage:             newMemStorage(),
		OCSP:                certmagic.OCSPConfig{DisableStapling: true},
		DisableARI:          true,
		DisableStorageCheck: true,
		Logger:              cmLog,
	})
	magic.Store(m.magic)
	return m
}

// stop ends certmagic's maintenance goroutine and waits for it.
func (m *certManager) stop() {
	m.stopOnce.Do(m.cache.Stop)
}

// get returns a valid certificate for host (normalized), issuing one on
// the first request and after expiry only. Concurrent callers for one host
// share one issuance.
func (m *certManager) get(ctx context.Context, host string) (*tls.Certificate, error) {
	if c := m.cached(host); c != nil {
		return c, nil
	}
	m.mu.Lock()
	if c := m.cached(host); c != nil { // issued while we waited for mu
		m.mu.Unlock()
		return c, nil
	}
	call, ok := m.inflight[host]
	if !ok {
		call = &certCall{done: make(chan struct{})}
		m.inflight[host] = call
	}
	m.mu.Unlock()
	if ok {
		select {
		case <-call.done:
			return call.cert, call.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	call.cert, call.err = m.obtain(ctx, host)
	m.mu.Lock()
	delete(m.inflight, host)
	m.mu.Unlock()
	close(call.done)
	return call.cert, call.err
}

// obtain has certmagic manage host: issue (or load from storage) and
// cache. A managed certificate that is no longer valid (maintenance could
// not renew it in time) is renewed here.
func (m *certManager) obtain(ctx context.Context, host string) (*tls.Certificate, error) {
	m.track(ctx, host)
	if err := m.magic.ManageSync(ctx, []string{host}); err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", host, err)
	}
	if c := m.cached(host); c != nil {
		return c, nil
	}
	stale := m.cache.AllMatchingCertificates(host)
	if err := m.magic.RenewCertSync(ctx, host, false); err != nil {
		return nil, fmt.Errorf("renew certificate for %s: %w", host, err)
	}
	if _, err := m.magic.CacheManagedCertificate(ctx, host); err != nil {
		return nil, fmt.Errorf("load renewed certificate for %s: %w", host, err)
	}
	var hashes []string
	for _, c := range stale {
		hashes = append(hashes, c.Hash())
	}
	m.cache.Remove(hashes)
	if c := m.cached(host); c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("no valid certificate for %s after renewal", host)
}

// track records host as managed and forgets the oldest host beyond
// maxHosts: its certificate leaves the cache and storage, and would be
// issued again if it came back.
func (m *certManager) track(ctx context.Context, host string) {
	m.mu.Lock()
	var drop []string
	if !m.managed[host] {
		m.managed[host] = true
		m.hosts = append(m.hosts, host)
		for len(m.hosts) > m.maxHosts {
			drop = append(drop, m.hosts[0])
			delete(m.managed, m.hosts[0])
			m.hosts = m.hosts[1:]
		}
	}
	m.mu.Unlock()
	for _, h := range drop {
		m.cache.RemoveManaged([]certmagic.SubjectIssuer{{Subject: h}})
		_ = m.magic.Storage.Delete(ctx, certmagic.StorageKeys.CertsSitePrefix(m.issuer.IssuerKey(), h))
		m.log.Debug("interception certificate dropped", zap.String("host", h), zap.Int("max_hosts", m.maxHosts))
	}
}

// certExpiryMargin: a certificate this close to expiry (or a tenth of
// its lifetime, if less) is not served.
const certExpiryMargin = time.Minute

// cached returns a currently valid certificate issued for exactly host.
func (m *certManager) cached(host string) *tls.Certificate {
	now := time.Now()
	var best *certmagic.Certificate
	for _, c := range m.cache.AllMatchingCertificates(host) {
		if c.Leaf == nil || !slices.Contains(c.Names, host) || now.Before(c.Leaf.NotBefore) {
			continue
		}
		margin := min(certExpiryMargin, c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)/10)
		if !now.Add(margin).Before(c.Leaf.NotAfter) {
			continue
		}
		if best == nil || c.Leaf.NotAfter.After(best.Leaf.NotAfter) {
			best = &c
		}
	}
	if best == nil {
		return nil
	}
	return &best.Certificate
}

// issued is how many certificates have been signed.
func (m *certManager) issued() int64 { return m.issuer.count.Load() }

// caIssuer is a certmagic.Issuer that signs with the interception CA.
type caIssuer struct {
	ca       *CA
	validity time.Duration
	allow    func(host string) bool
	key      string
	log      *zap.Logger
	count    atomic.Int64
}

var _ certmagic.Issuer = (*caIssuer)(nil)

// IssuerKey implements certmagic.Issuer; it names the CA, so storage never
// serves a certificate signed by a CA that is no longer configured.
func (i *caIssuer) IssuerKey() string { return i.key }

// Issue implements certmagic.Issuer: one name, a routed one, an ECDSA key.
func (i *caIssuer) Issue(_ context.Context, csr *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature: %w", err)
	}
	names := slices.Clone(csr.DNSNames)
	for _, ip := range csr.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) != 1 || len(csr.EmailAddresses) > 0 || len(csr.URIs) > 0 {
		return nil, fmt.Errorf("CSR must name exactly one host, not %q", names)
	}
	name := names[0]
	if i.allow != nil && !i.allow(name) {
		return nil, fmt.Errorf("refusing to sign for %s: no route names it", name)
	}
	if _, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok {
		return nil, fmt.Errorf("CSR key is %T; interception certificates use ECDSA", csr.PublicKey)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notAfter := now.Add(i.validity)
	if notAfter.After(i.ca.cert.NotAfter) {
		notAfter = i.ca.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-min(notBeforeSkew, i.validity/10)),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if len(name) <= 64 {
		tmpl.Subject = pkix.Name{CommonName: name}
	}
	if ip := net.ParseIP(name); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{name}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, i.ca.cert, csr.PublicKey, i.ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", name, err)
	}
	i.count.Add(1)
	i.log.Info("interception certificate issued", zap.String("host", name),
		zap.String("serial", serial.Text(16)), zap.Time("not_after", notAfter))
	leaf := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &certmagic.IssuedCertificate{Certificate: append(leaf, i.ca.chainPEM...)}, nil
}

// ---- memory storage ----

// memStorage is a certmagic.Storage in memory: certificates and keys never
// touch disk and vanish with the process. Locks are in-process.
type memStorage struct {
	mu    sync.Mutex
	items map[string]memItem
	locks map[string]chan struct{}
}

type memItem struct {
	value    []byte
	modified time.Time
}

var _ certmagic.Storage = (*memStorage)(nil)

func newMemStorage() *memStorage {
	return &memStorage{items: make(map[string]memItem), locks: make(map[string]chan struct{})}
}

func (s *memStorage) String() string { return "credproxy memory storage" }

// Lock implements certmagic.Locker: it waits while name is held.
func (s *memStorage) Lock(ctx context.Context, name string) error {
	for {
		s.mu.Lock()
		held, ok := s.locks[name]
		if !ok {
			s.locks[name] = make(chan struct{})
			s.mu.Unlock()
			return nil
		}
		s.mu.Unlock()
		select {
		case <-held:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Unlock implements certmagic.Locker.
func (s *memStorage) Unlock(_ context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	held, ok := s.locks[name]
	if !ok {
		return fmt.Errorf("unlock %s: not locked", name)
	}
	delete(s.locks, name)
	close(held)
	return nil
}

func (s *memStorage) Store(_ context.Context, key string, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.items[key] = memItem{value: slices.Clone(value), modified: time.Now()}
	return nil
}

func (s *memStorage) Load(_ context.Context, key string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	it, ok := s.items[key]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return slices.Clone(it.value), nil
}

// Delete removes key and, for a "directory", everything below it.
func (s *memStorage) Delete(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.items, key)
	prefix := strings.TrimSuffix(key, "/") + "/"
	for k := range s.items {
		if strings.HasPrefix(k, prefix) {
			delete(s.items, k)
		}
	}
	return nil
}

func (s *memStorage) Exists(_ context.Context, key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.items[key]; ok {
		return true
	}
	prefix := strings.TrimSuffix(key, "/") + "/"
	for k := range s.items {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}

// List returns the keys below path: all of them when recursive, else its
// immediate children (files and "directories").
func (s *memStorage) List(_ context.Context, path string, recursive bool) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	prefix := strings.TrimSuffix(path, "/") + "/"
	seen := map[string]bool{}
	var out []string
	for k := range s.items {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		if !recursive {
			if i := strings.IndexByte(rest, '/'); i >= 0 {
				k = prefix + rest[:i]
			}
		}
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	if len(out) == 0 {
		return nil, fs.ErrNotExist
	}
	slices.Sort(out)
	return out, nil
}

func (s *memStorage) Stat(_ context.Context, key string) (certmagic.KeyInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if it, ok := s.items[key]; ok {
		return certmagic.KeyInfo{Key: key, Modified: it.modified, Size: int64(len(it.value)), IsTerminal: true}, nil
	}
	prefix := strings.TrimSuffix(key, "/") + "/"
	for k := range s.items {
		if strings.HasPrefix(k, prefix) {
			return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
		}
	}
	return certmagic.KeyInfo{}, fs.ErrNotExist
}
