package credentials

import (
	"context"
	"fmt"
	"os"
	"strings"
)

// Static serves literal fields. A field named X_file is read from that file
// (one trailing newline trimmed) and served as X, so the value can live in a
// mounted secret rather than in the config.
type Static struct {
	cred *Credential
}

// NewStatic reads any *_file fields now, so a missing file is a start-up
// error rather than a failed session.
func NewStatic(fields map[string]string) (*Static, error) {
	out := make(map[string]Secret, len(fields))
	for name, v := range fields {
		if base, ok := strings.CutSuffix(name, "_file"); ok && base != "" {
			b, err := os.ReadFile(v)
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", name, err)
			}
			s := strings.TrimSuffix(string(b), "\n")
			s = strings.TrimSuffix(s, "\r")
			out[base] = NewSecret(s)
			continue
		}
		out[name] = NewSecret(v)
	}
	return &Static{cred: &Credential{Fields: out}}, nil
}

// Fetch returns the fields; they never change until the config is reloaded.
func (s *Static) Fetch(context.Context) (*Credential, error) { return s.cred, nil }

// Env serves fields from environment variables, read on every fetch.
type Env struct {
	vars map[string]string // field -> variable name
}

// NewEnv maps each field to the environment variable that holds it.
func NewEnv(vars map[string]string) *Env { return &Env{vars: vars} }

// Fetch reads the variables. An unset variable is an error that names the
// variable (never a value).
func (e *Env) Fetch(context.Context) (*Credential, error) {
	out := make(map[string]Secret, len(e.vars))
	for field, name := range e.vars {
		v, ok := os.LookupEnv(name)
		if !ok {
			return nil, fmt.Errorf("environment variable %s is not set", name)
		}
		out[field] = NewSecret(v)
	}
	return &Credential{Fields: out}, nil
}
