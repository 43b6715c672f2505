package identity

import (
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap/zapcore"
)

// How a connection was tied to a workload (the audit record's
// workload.attribution).
const (
	// AttributionCSI: the connection arrived on the pod's own socket,
	// published into the pod by credproxy's CSI node plugin.
	AttributionCSI = "csi"
	// AttributionCSIPeer: as csi, and the connecting process was checked
	// to be in the pod's cgroup (SO_PEERCRED, through a pidfd).
	AttributionCSIPeer = "csi+peercred"
	// AttributionNetns: the connection arrived on a listener bound inside
	// the pod's network namespace, which only the pod's containers share.
	AttributionNetns = "netns"
)

// Workload is a pod credproxy serves in DaemonSet mode: who it is, as the
// kubelet and the API server say, and the token the kubelet minted for it.
// Everything here but the token is an attribute the pod cannot change
// about itself; credproxy never decides on labels or annotations.
type Workload struct {
	Namespace         string
	ServiceAccount    string
	ServiceAccountUID string
	Pod               string
	PodUID            string
	Node              string

	token *TokenSource
}

// NewWorkload returns w with a token source holding tok.
func NewWorkload(w Workload, tok Token, expiry time.Time) *Workload {
	w.token = &TokenSource{}
	w.token.Set(tok, expiry)
	return &w
}

// Token is the workload's token source: the pod-bound token, which a
// republish replaces.
func (w *Workload) Token() *TokenSource { return w.token }

func (w *Workload) String() string {
	return fmt.Sprintf("%s/%s (service account %s, uid %s)", w.Namespace, w.Pod, w.ServiceAccount, w.PodUID)
}

// MarshalLogObject logs the workload's names, never its token.
func (w *Workload) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("namespace", w.Namespace)
	enc.AddString("service_account", w.ServiceAccount)
	enc.AddString("pod", w.Pod)
	enc.AddString("pod_uid", w.PodUID)
	return nil
}

// Token is a bearer token (a pod's service account JWT). Like
// credentials.Secret it never prints: fmt (every verb), encoding/json,
// encoding.TextMarshaler and zap render it as REDACTED. Reveal it only
// where it leaves for Vault.
type Token struct {
	value *string
}

// NewToken wraps a token.
func NewToken(v string) Token { return Token{value: &v} }

// Reveal returns the token.
func (t Token) Reveal() string {
	if t.value == nil {
		return ""
	}
	return *t.value
}

// IsZero reports whether there is no token.
func (t Token) IsZero() bool { return t.Reveal() == "" }

const redacted = "REDACTED"

func (Token) String() string               { return redacted }
func (Token) GoString() string             { return redacted }
func (Token) Format(f fmt.State, _ rune)   { _, _ = f.Write([]byte(redacted)) }
func (Token) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Token) MarshalText() ([]byte, error) { return []byte(redacted), nil }
func (Token) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("value", redacted)
	return nil
}

// TokenSource holds the current token of a workload; the kubelet's
// republish replaces it before the old one expires.
type TokenSource struct {
	mu     sync.Mutex
	tok    Token
	expiry time.Time
}

// Set installs a new token.
func (s *TokenSource) Set(t Token, expiry time.Time) {
	s.mu.Lock()
	s.tok, s.expiry = t, expiry
	s.mu.Unlock()
}

// Get returns the current token and when it expires (zero: unknown).
func (s *TokenSource) Get() (Token, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tok, s.expiry
}
