package credentials

import (
	"fmt"

	"go.uber.org/zap/zapcore"
)

// redacted is what a Secret prints, whatever the verb or encoder.
const redacted = "REDACTED"

// Secret holds one credential value. It never prints itself: fmt (every verb),
// encoding/json, encoding.TextMarshaler and zap all render it as REDACTED.
// Code that must send the value upstream calls Reveal, and only there.
//
// The value sits behind a pointer: fmt cannot call methods on a Secret held
// in another struct's unexported field and prints such fields by
// reflection, which shows a pointer's address, never the string.
type Secret struct {
	value *string
}

// NewSecret wraps a value.
func NewSecret(v string) Secret { return Secret{value: &v} }

// Reveal returns the value. Call it only where the value leaves for its
// destination (an upstream handshake, an injected header).
func (s Secret) Reveal() string {
	if s.value == nil {
		return ""
	}
	return *s.value
}

// IsZero reports whether the value is empty.
func (s Secret) IsZero() bool { return s.Reveal() == "" }

// Equal reports whether two secrets hold the same value.
func (s Secret) Equal(o Secret) bool { return s.Reveal() == o.Reveal() }

func (Secret) String() string   { return redacted }
func (Secret) GoString() string { return redacted }

// Format covers every fmt verb, including %d and %x, which would otherwise
// print the struct's field.
func (Secret) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// MarshalJSON implements json.Marshaler.
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }

// MarshalText implements encoding.TextMarshaler (YAML, map keys, flag values).
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// MarshalLogObject implements zapcore.ObjectMarshaler.
func (Secret) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("value", redacted)
	return nil
}
