package proxy

import (
	"context"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
)

// watchDebounce gathers the burst of events one update makes (Kubernetes
// swaps a ..data symlink: several creates, renames and removes) into one
// reload.
const watchDebounce = 300 * time.Millisecond

// Watch calls reload when the config file or any file it references
// changes, until ctx ends. It watches directories rather than files, so an
// atomic rename or a Kubernetes symlink swap is seen; after each reload it
// asks files for the current list of paths.
func Watch(ctx context.Context, log *zap.Logger, files func() []string, reload func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	watched := map[string]bool{}
	relevant := map[string]bool{}
	resync := func() {
		want := map[string]bool{}
		relevant = map[string]bool{}
		for _, f := range files() {
			want[filepath.Dir(f)] = true
			relevant[filepath.Clean(f)] = true
		}
		for d := range watched {
			if !want[d] {
				_ = w.Remove(d)
				delete(watched, d)
			}
		}
		for d := range want {
			if watched[d] {
				continue
			}
			if err := w.Add(d); err != nil {
				log.Warn("cannot watch directory", zap.String("dir", d), zap.Error(err))
				continue
			}
			watched[d] = true
		}
	}
	resync()
	var fire <-chan time.Time
	var timer *time.Timer
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			// Our own files, or Kubernetes' ..data swap in a mounted
			// volume; not the audit log or anything else beside them.
			name := filepath.Clean(ev.Name)
			if ev.Op == fsnotify.Chmod || !(relevant[name] || strings.HasPrefix(filepath.Base(name), "..")) {
				continue
			}
			if timer == nil {
				timer = time.NewTimer(watchDebounce)
			} else {
				timer.Reset(watchDebounce)
			}
			fire = timer.C
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			log.Warn("file watch error", zap.Error(err))
		case <-fire:
			fire = nil
			log.Info("config or referenced file changed; reloading")
			reload()
			resync()
		}
	}
}

// ReferencedFiles lists the config file at path and every file the
// running config names: static *_file secrets, the Vault CA and auth
// files, and what each service was built from (Service.Files: TLS
// material, the HTTP CA).
func (s *Server) ReferencedFiles(path string) []string {
	s.mu.Lock()
	svcs := s.svcs
	if len(s.files) > 0 {
		svcs = append(slices.Clone(svcs), Service{Files: s.files})
	}
	s.mu.Unlock()
	return referencedFiles(path, s.Config(), svcs)
}

func referencedFiles(path string, cfg *config.Config, svcs []Service) []string {
	set := map[string]bool{}
	add := func(f string) {
		if f != "" {
			set[f] = true
		}
	}
	abs, err := filepath.Abs(path)
	if err == nil {
		path = abs
	}
	add(path)
	if cfg != nil {
		for _, s := range cfg.Secrets {
			for k, v := range s.Static {
				if strings.HasSuffix(k, "_file") {
					add(v)
				}
			}
		}
		if v := cfg.Vault; v != nil {
			add(v.CAFile)
			add(v.Auth.TokenFile)
			add(v.Auth.RoleIDFile)
			add(v.Auth.SecretIDFile)
		}
	}
	for _, sv := range svcs {
		for _, f := range sv.Files {
			add(f)
		}
	}
	out := make([]string, 0, len(set))
	for f := range set {
		out = append(out, f)
	}
	sort.Strings(out)
	return out
}
