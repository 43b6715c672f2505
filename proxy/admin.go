package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// admin serves /metrics, /healthz and /readyz. Nothing it serves reveals a
// secret: readiness names credentials and their sources' errors, which are
// scrubbed like every other error credproxy shows.
type admin struct {
	srv *http.Server
	ln  net.Listener
	log *zap.Logger
	// done is closed when Serve returns.
	done chan struct{}
}

func newAdmin(addr string, s *Server) (*admin, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		problems := s.notReady()
		if len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready\n" + strings.Join(problems, "\n") + "\n"))
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	a := &admin{
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute,
			ErrorLog: zap.NewStdLog(s.log.Named("admin"))},
		ln: ln, log: s.log.Named("admin"), done: make(chan struct{}),
	}
	return a, nil
}

func (a *admin) serve() {
	defer close(a.done)
	if err := a.srv.Serve(a.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		a.log.Error("admin server stopped", zap.Error(err))
	}
}

func (a *admin) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = a.srv.Shutdown(ctx)
	<-a.done
}

// notReady lists why the server is not ready; empty when it is.
func (s *Server) notReady() []string {
	var out []string
	s.mu.Lock()
	if s.draining {
		out = append(out, "draining: shutting down")
	}
	if !s.started {
		out = append(out, "listeners: not bound yet")
	}
	vault := s.vault
	s.mu.Unlock()
	if vault != nil {
		if err := vault.Ready(); err != nil {
			out = append(out, "vault: "+err.Error())
		}
	}
	for name, err := range s.store.Ready() {
		out = append(out, fmt.Sprintf("credential %q: %v", name, err))
	}
	sort.Strings(out)
	return out
}
