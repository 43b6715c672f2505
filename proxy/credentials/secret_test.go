package credentials

import (
	"bytes"
	"encoding"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// testSecretValue is what every test in this file hides. Its hex form is
// checked too, since %x of a plain struct would print the field in hex.
const testSecretValue = "hunter2-s3cr3t"

// assertRedacted fails when out contains the secret in clear or in hex.
func assertRedacted(t *testing.T, what, out string) {
	t.Helper()
	hexLower := fmt.Sprintf("%x", []byte(testSecretValue))
	hexUpper := fmt.Sprintf("%X", []byte(testSecretValue))
	for _, leak := range []string{testSecretValue, hexLower, hexUpper} {
		if i := strings.Index(out, leak); i >= 0 {
			t.Errorf("%s leaked the secret: ...%s...", what, out[max(0, i-40):min(len(out), i+len(leak)+10)])
			return
		}
	}
}

func TestSecretReveal(t *testing.T) {
	s := NewSecret(testSecretValue)
	if got := s.Reveal(); got != testSecretValue {
		t.Errorf("Reveal() = %q, want %q", got, testSecretValue)
	}
	if s.IsZero() {
		t.Errorf("IsZero() = true for a non-empty secret")
	}
	if !(Secret{}).IsZero() {
		t.Errorf("IsZero() = false for the zero Secret")
	}
	if !s.Equal(NewSecret(testSecretValue)) {
		t.Errorf("Equal() = false for the same value")
	}
	if s.Equal(NewSecret("other")) {
		t.Errorf("Equal() = true for different values")
	}
}

// exportedHolder is how a config or credential struct holds a Secret.
type exportedHolder struct {
	Name     string
	Password Secret
	Ptr      *Secret
}

func TestSecretFmtVerbs(t *testing.T) {
	s := NewSecret(testSecretValue)
	cred := &Credential{Fields: map[string]Secret{"username": NewSecret("app"), "password": s}}
	values := []struct {
		name string
		v    any
	}{
		{"value", s},
		{"pointer", &s},
		{"exported struct field", exportedHolder{Name: "x", Password: s, Ptr: &s}},
		{"pointer to struct", &exportedHolder{Name: "x", Password: s, Ptr: &s}},
		{"map value", map[string]Secret{"password": s}},
		{"slice", []Secret{s, s}},
		{"any slice", []any{s}},
		{"credential", cred},
		{"credential value", *cred},
	}
	verbs := []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T %v", "%10.3s", "%-20v"}
	for _, tc := range values {
		for _, verb := range verbs {
			t.Run(tc.name+"/"+verb, func(t *testing.T) {
				out := fmt.Sprintf(verb, tc.v)
				assertRedacted(t, fmt.Sprintf("Sprintf(%q)", verb), out)
			})
		}
	}
	t.Run("Sprint and Sprintln", func(t *testing.T) {
		assertRedacted(t, "Sprint", fmt.Sprint(s, &s, cred))
		assertRedacted(t, "Sprintln", fmt.Sprintln(s, &s, cred))
	})
	t.Run("String and GoString", func(t *testing.T) {
		if got := s.String(); got != "REDACTED" {
			t.Errorf("String() = %q, want REDACTED", got)
		}
		if got := s.GoString(); got != "REDACTED" {
			t.Errorf("GoString() = %q, want REDACTED", got)
		}
	})
	t.Run("error wrapping", func(t *testing.T) {
		err := fmt.Errorf("login as %v with %s: %w", "app", s, fmt.Errorf("inner %+v", s))
		assertRedacted(t, "error", err.Error())
	})
}

// unexportedHolder holds secrets the way a package's private state does:
// in unexported fields, where fmt cannot call the Secret's methods.
type unexportedHolder struct {
	name     string
	password Secret
	cred     Credential
}

// fmt cannot call methods on values reached through unexported fields and
// prints them by reflection: a Secret (or a Credential) held in a private
// field must still not show its value.
func TestSecretFmtVerbsUnexportedField(t *testing.T) {
	s := NewSecret(testSecretValue)
	h := unexportedHolder{
		name:     "x",
		password: s,
		cred:     Credential{Fields: map[string]Secret{"password": s}},
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
		t.Run(verb, func(t *testing.T) {
			assertRedacted(t, fmt.Sprintf("Sprintf(%q) of a struct with unexported Secret fields", verb), fmt.Sprintf(verb, h))
		})
	}
}

func TestSecretJSON(t *testing.T) {
	s := NewSecret(testSecretValue)
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"value", s, `"REDACTED"`},
		{"pointer", &s, `"REDACTED"`},
		{"struct", exportedHolder{Name: "x", Password: s, Ptr: &s}, `{"Name":"x","Password":"REDACTED","Ptr":"REDACTED"}`},
		{"map value", map[string]Secret{"password": s}, `{"password":"REDACTED"}`},
		{"map key", map[Secret]string{s: "v"}, `{"REDACTED":"v"}`},
		{"slice", []Secret{s}, `["REDACTED"]`},
		{"credential fields", Credential{Fields: map[string]Secret{"password": s}}.Fields, `{"password":"REDACTED"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(tc.v)
			if err != nil {
				t.Fatalf("json.Marshal: %v", err)
			}
			if got := string(b); got != tc.want {
				t.Errorf("json.Marshal = %s, want %s", got, tc.want)
			}
			assertRedacted(t, "json.Marshal", string(b))

			var buf bytes.Buffer
			enc := json.NewEncoder(&buf)
			enc.SetIndent("", "  ")
			if err := enc.Encode(tc.v); err != nil {
				t.Fatalf("json.Encoder: %v", err)
			}
			assertRedacted(t, "json.Encoder", buf.String())
		})
	}
}

func TestSecretTextMarshaler(t *testing.T) {
	s := NewSecret(testSecretValue)
	var tm encoding.TextMarshaler = s
	b, err := tm.MarshalText()
	if err != nil {
		t.Fatalf("MarshalText: %v", err)
	}
	if got := string(b); got != "REDACTED" {
		t.Errorf("MarshalText = %q, want REDACTED", got)
	}
	tm = &s
	b, err = tm.MarshalText()
	if err != nil {
		t.Fatalf("MarshalText via pointer: %v", err)
	}
	if got := string(b); got != "REDACTED" {
		t.Errorf("MarshalText via pointer = %q, want REDACTED", got)
	}
}

func TestSecretZap(t *testing.T) {
	s := NewSecret(testSecretValue)
	cred := &Credential{Fields: map[string]Secret{"username": NewSecret("app"), "password": s}}
	fields := []zap.Field{
		zap.Any("any", s),
		zap.Any("any_ptr", &s),
		zap.Object("object", s),
		zap.Reflect("reflect", s),
		zap.Stringer("stringer", s),
		zap.Any("struct", exportedHolder{Name: "x", Password: s, Ptr: &s}),
		zap.Reflect("struct_reflect", exportedHolder{Name: "x", Password: s, Ptr: &s}),
		zap.Any("map", map[string]Secret{"password": s}),
		zap.Any("credential", cred),
		zap.Reflect("credential_reflect", cred),
		zap.Any("slice", []Secret{s}),
		zap.Error(fmt.Errorf("wrapped %v", s)),
	}

	t.Run("observer", func(t *testing.T) {
		core, logs := observer.New(zapcore.DebugLevel)
		zap.New(core).With(zap.Any("with", s)).Info("login", fields...)
		entries := logs.All()
		if len(entries) != 1 {
			t.Fatalf("got %d log entries, want 1", len(entries))
		}
		ctx := entries[0].ContextMap()
		assertRedacted(t, "observer context", fmt.Sprintf("%#v", ctx))
		got, ok := ctx["object"].(map[string]any)
		if !ok {
			t.Fatalf("object field = %#v, want a map", ctx["object"])
		}
		if got["value"] != "REDACTED" {
			t.Errorf("object field value = %v, want REDACTED", got["value"])
		}
	})

	encoders := []struct {
		name string
		enc  zapcore.Encoder
	}{
		{"json", zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())},
		{"console", zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig())},
	}
	for _, tc := range encoders {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			log := zap.New(zapcore.NewCore(tc.enc, zapcore.AddSync(&buf), zapcore.DebugLevel))
			log.With(zap.Any("with", s)).Info("login", fields...)
			log.Sugar().Infow("sugared", "secret", s, "credential", cred)
			log.Sugar().Infof("formatted %v %s %+v", s, s, cred)
			if err := log.Sync(); err != nil {
				t.Fatalf("Sync: %v", err)
			}
			if buf.Len() == 0 {
				t.Fatalf("nothing logged")
			}
			assertRedacted(t, tc.name+" encoder", buf.String())
			if !strings.Contains(buf.String(), "REDACTED") {
				t.Errorf("log does not show REDACTED: %s", buf.String())
			}
		})
	}
}
