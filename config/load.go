package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"

	"gopkg.in/yaml.v3"
)

// Load reads the configuration file at path; see Parse. Relative file paths
// in it are resolved against the file's own directory, so credproxy behaves
// the same whatever directory it is started from.
func Load(path string) (*Config, error) {
	cfg, _, err := LoadWithWarnings(path)
	return cfg, err
}

// LoadWithWarnings is Load that also returns the warnings (see
// Config.Warnings) when the configuration is invalid, so that one run of
// validate shows everything it found.
func LoadWithWarnings(path string) (*Config, []*FieldError, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	return parseConfig(data, filepath.Dir(abs))
}

// Parse decodes, expands, defaults and validates a YAML configuration.
//
// In every string value (never in keys) ${VAR} is replaced by the environment
// variable VAR, and ${VAR:-default} by VAR or, when VAR is unset or empty, by
// default; an unset VAR without a default is an error. $$ yields a literal $
// (so a literal "${" is written "$${"); any other $ is kept as written.
//
// Unknown keys are errors. Relative file paths are resolved against baseDir;
// an empty baseDir leaves them relative to the working directory.
//
// On failure the error is an Errors holding every problem found, each
// prefixed with its key path; Lines splits it for printing.
func Parse(data []byte, baseDir string) (*Config, error) {
	cfg, _, err := parseConfig(data, baseDir)
	return cfg, err
}

func parseConfig(data []byte, baseDir string) (*Config, []*FieldError, error) {
	root, err := parseYAML(data)
	if err != nil {
		return nil, nil, Errors{err}
	}
	if baseDir != "" {
		if baseDir, err = filepath.Abs(baseDir); err != nil {
			return nil, nil, Errors{fmt.Errorf("config base directory: %w", err)}
		}
	}

	cfg := &Config{}
	d := newDecoder(os.LookupEnv)
	if root != nil {
		d.decode(root, reflect.ValueOf(cfg).Elem(), "")
	}
	if d.bad[""] {
		return nil, nil, d.errs // nothing usable was decoded; validating would only add noise
	}
	cfg.applyDefaults(d.present)
	cfg.resolvePaths(baseDir)

	v := &validator{skip: d.bad, lookup: os.LookupEnv}
	cfg.validate(v)
	errs := append(d.errs, v.errs...)
	if len(errs) > 0 {
		return nil, v.warnings, errs
	}
	cfg.warnings = v.warnings
	return cfg, v.warnings, nil
}

// parseYAML parses exactly one YAML document. It returns a nil node for an
// empty document.
func parseYAML(data []byte) (root *yaml.Node, err error) {
	// yaml.v3 has panicked on malformed input before; a config file must
	// never crash the process (SIGHUP reloads parse while serving).
	defer func() {
		if r := recover(); r != nil {
			root, err = nil, fmt.Errorf("parse config: yaml: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, fmt.Errorf("parse config: %w", err)
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, fmt.Errorf("parse config: %w", err)
	default:
		return nil, fmt.Errorf("parse config: line %d: only one YAML document is allowed", extra.Line)
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	return doc.Content[0], nil
}
