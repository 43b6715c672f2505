package vaulttest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
)

// Signer mints signed JWTs for the jwt and kubernetes auth methods: give
// PublicKeyPEM to auth/<mount>/config (jwt_validation_pubkeys or pem_keys)
// and log in with what Sign returns.
type Signer struct {
	key crypto.Signer
	alg jose.SignatureAlgorithm
	kid string
}

// NewSigner returns an RS256 signer with a fresh 2048-bit key.
func NewSigner(t testing.TB) *Signer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatalf("vaulttest: generate RSA key: %v", err)
	}
	return &Signer{key: key, alg: jose.RS256, kid: randomHex(16)}
}

// NewECSigner returns an ES256 signer with a fresh P-256 key.
func NewECSigner(t testing.TB) *Signer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("vaulttest: generate EC key: %v", err)
	}
	return &Signer{key: key, alg: jose.ES256, kid: randomHex(16)}
}

// PublicKeyPEM returns the public key as a PEM "PUBLIC KEY" block.
func (s *Signer) PublicKeyPEM() string {
	der, err := x509.MarshalPKIXPublicKey(s.key.Public())
	if err != nil {
		panic(err) // RSA and ECDSA keys always marshal
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// Sign returns a compact JWS of claims.
func (s *Signer) Sign(t testing.TB, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: s.alg, Key: s.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", s.kid))
	if err != nil {
		t.Fatalf("vaulttest: signer: %v", err)
	}
	raw, err := josejwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatalf("vaulttest: sign JWT: %v", err)
	}
	return raw
}

// JWTClaims returns claims for a JWT valid from a minute ago for ttl, with
// the given issuer, subject and audience.
func JWTClaims(issuer, subject, audience string, ttl time.Duration) map[string]any {
	now := time.Now()
	return map[string]any{
		"iss": issuer,
		"sub": subject,
		"aud": []string{audience},
		"iat": now.Add(-time.Minute).Unix(),
		"nbf": now.Add(-time.Minute).Unix(),
		"exp": now.Add(ttl).Unix(),
	}
}

// KubernetesClaims returns the claims of a projected service-account
// token for namespace/name, valid for ttl, with audience aud.
func KubernetesClaims(namespace, name, aud string, ttl time.Duration) map[string]any {
	now := time.Now()
	return map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"sub": "system:serviceaccount:" + namespace + ":" + name,
		"aud": []string{aud},
		"iat": now.Unix(),
		"nbf": now.Unix(),
		"exp": now.Add(ttl).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      namespace,
			"pod":            map[string]any{"name": name + "-pod", "uid": newUUID()},
			"serviceaccount": map[string]any{"name": name, "uid": newUUID()},
		},
	}
}
