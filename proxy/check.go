package proxy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Check builds everything New builds from cfg with o's protocols, to find
// what would make run fail, and releases it again. It binds nothing,
// contacts nothing (no Vault login, no database, no upstream) and writes
// nothing: the audit log is not opened, only checked to be one credproxy
// could open.
//
// It reports every problem it finds, each starting with its key path:
// the Vault client (vault.ca_file), each secret's source (static *_file
// fields are read), the audit log, then each protocol's (Protocol.Check:
// a postgres service's upstream CA, client certificate and client_tls key
// pair; the HTTP proxy's routes, CA and upstream roots). When those all
// pass it runs New itself, the code run uses, with the audit log left
// out, and closes the result: whatever New checks that the steps before
// miss still fails Check. The server it builds never serves, so nothing
// it holds dials.
//
// The error, if any, is a config.Errors; config.Lines splits it.
func Check(cfg *config.Config, o Options) error {
	var errs config.Errors
	fail := func(path string, err error) {
		errs = append(errs, &config.FieldError{Path: path, Msg: err.Error()})
	}

	var vault *credentials.VaultClient
	if cfg.Vault != nil {
		vc, err := credentials.NewVaultClient(*cfg.Vault, zap.NewNop())
		if err != nil {
			fail("vault", err)
		} else {
			vault = vc
			defer vc.Close()
		}
	}
	names := make([]string, 0, len(cfg.Secrets))
	for name := range cfg.Secrets {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		sc := cfg.Secrets[name]
		if sc.Vault != nil && vault == nil {
			continue // the vault block's problem is reported above
		}
		if _, err := BuildSources(map[string]config.Secret{name: sc}, vault); err != nil {
			errs = append(errs, err) // starts with secrets.NAME
		}
	}
	if err := checkAudit(cfg.Audit.Path); err != nil {
		fail("audit.path", err)
	}
	for _, p := range o.Protocols {
		errs = append(errs, p.Check(cfg)...)
	}
	if len(errs) > 0 {
		return errs
	}

	noAudit := *cfg
	noAudit.Audit.Path = ""
	srv, err := New(&noAudit, zap.NewNop(), o)
	if err != nil {
		return config.Errors{err}
	}
	if err := srv.Close(); err != nil {
		return config.Errors{err}
	}
	return nil
}

// checkAudit reports whether audit.Open could open path for appending,
// without creating or changing it: an existing regular file must open for
// writing, and a missing one needs a directory credproxy may write in.
// (config checked that the directory exists.)
func checkAudit(path string) error {
	if path == "" || path == "-" {
		return nil
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		dir := filepath.Dir(path)
		if err := canCreateIn(dir); err != nil {
			return fmt.Errorf("cannot create %s in %s: %w", filepath.Base(path), dir, err)
		}
		return nil
	case err != nil:
		return err
	case !fi.Mode().IsRegular():
		return nil // a FIFO or device: opening it to check could block
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// LogWarnings logs cfg's warnings (config.Config.Warnings), one warn line
// each, so that a config that only warns is still visible in the logs.
// run calls it at start and on every reload.
func LogWarnings(log *zap.Logger, path string, cfg *config.Config) {
	for _, w := range cfg.Warnings() {
		log.Warn("config warning", zap.String("config", path), zap.String("key", w.Path), zap.String("warning", w.Msg))
	}
}
