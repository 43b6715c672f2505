// Package credentials provides named secret sources (static, env, and later
// Vault) behind one small interface, and a Store that caches what they return
// and tracks which sessions use which credential, so leased credentials can
// be shared, renewed, rotated and revoked.
package credentials

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"go.uber.org/zap/zapcore"
)

// Credential is one set of fields read together from a source: a username and
// password from the same lease, a token, an access key pair.
type Credential struct {
	Fields map[string]Secret
	Lease  Lease
}

// Field returns one field's value.
func (c *Credential) Field(name string) (Secret, bool) {
	s, ok := c.Fields[name]
	return s, ok
}

// FieldNames lists the fields the credential has, sorted; useful in errors
// that must say what is missing without showing any value.
func (c *Credential) FieldNames() []string { return sortedKeys(c.Fields) }

func sortedKeys[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Lease describes how long a credential is valid. A zero Lease means the
// credential does not expire (static and env sources, KV reads).
type Lease struct {
	// ID is the source's opaque handle (a Vault lease id). It is a secret in
	// itself: log or audit only IDHash.
	ID        string
	TTL       time.Duration
	Renewable bool
	// Issued is when the source handed out (or last renewed) the lease.
	Issued time.Time
	// Owner is what the lease cannot outlive (the Vault token that created
	// it); nil when nothing but its own TTL ends it.
	Owner *Owner
}

// Leased reports whether the credential carries a lease that expires.
func (l Lease) Leased() bool { return l.ID != "" || l.TTL > 0 }

// Expiry is when the lease ends; the zero time for an unleased credential.
func (l Lease) Expiry() time.Time {
	if !l.Leased() {
		return time.Time{}
	}
	return l.Issued.Add(l.TTL)
}

// IDHash is the hex SHA-256 of the lease ID, safe to log and audit.
func (l Lease) IDHash() string {
	if l.ID == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(l.ID))
	return hex.EncodeToString(sum[:])
}

// Source reads a fresh credential from one backend. Implementations must be
// safe for concurrent use. The Store calls Fetch only when its cache cannot
// serve, so a Source need not cache.
type Source interface {
	Fetch(ctx context.Context) (*Credential, error)
}

// Leaser is implemented by sources whose credentials carry leases that can be
// extended and ended early (Vault's sys/leases/renew and revoke).
type Leaser interface {
	// Renew asks for the lease to be extended by increment and returns the
	// lease as the source now grants it (its TTL may be shorter: max_ttl).
	Renew(ctx context.Context, lease Lease, increment time.Duration) (Lease, error)
	// Revoke ends the lease now.
	Revoke(ctx context.Context, lease Lease) error
}

// String shows the lease by its hash; the ID itself is a secret.
func (l Lease) String() string {
	if !l.Leased() {
		return "no lease"
	}
	return fmt.Sprintf("lease sha256:%.12s ttl=%s renewable=%t", l.IDHash(), l.TTL, l.Renewable)
}

// GoString is String, so %#v cannot print the ID either.
func (l Lease) GoString() string { return l.String() }

// Format covers every fmt verb.
func (l Lease) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(l.String())) }

// MarshalJSON renders the lease as the audit log does: hash and TTL.
func (l Lease) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		IDSHA256  string  `json:"id_sha256,omitempty"`
		TTLSecs   float64 `json:"ttl_s"`
		Renewable bool    `json:"renewable"`
	}{l.IDHash(), l.TTL.Seconds(), l.Renewable})
}

// MarshalLogObject implements zapcore.ObjectMarshaler.
func (l Lease) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("id_sha256", l.IDHash())
	enc.AddDuration("ttl", l.TTL)
	enc.AddBool("renewable", l.Renewable)
	return nil
}
