package config

import (
	"errors"
	"strings"
)

// FieldError is one problem in the configuration, tied to the key that has it.
type FieldError struct {
	// Path is the key path, e.g. "postgres[0].tls.mode"; empty for the whole document.
	Path string
	Msg  string
}

func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// Errors is every problem found in a configuration, in the order found.
// Parse returns one (as error) whenever the configuration is unusable.
type Errors []error

// Error joins the problems with newlines.
func (e Errors) Error() string { return strings.Join(e.Lines(), "\n") }

// Unwrap lets errors.Is and errors.As see each problem.
func (e Errors) Unwrap() []error { return e }

// Lines returns one line per problem, e.g.
// "postgres[0].tls.mode: must be one of disable, require, verify-ca, verify-full".
func (e Errors) Lines() []string {
	lines := make([]string, len(e))
	for i, err := range e {
		lines[i] = err.Error()
	}
	return lines
}

// Lines returns the problems in err one per line, whether or not err is an
// Errors, so a caller can print any Load failure the same way.
func Lines(err error) []string {
	if err == nil {
		return nil
	}
	var errs Errors
	if errors.As(err, &errs) {
		return errs.Lines()
	}
	return []string{err.Error()}
}

// Warnings returns what the configuration does that credproxy accepts but
// an operator should know about (a credential sent in cleartext, a route to
// an IP address), each with its key path, in the order found. validate
// prints them; run logs them at start and on every reload.
func (c *Config) Warnings() []*FieldError { return c.warnings }
