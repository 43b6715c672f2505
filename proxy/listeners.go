package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// svc is one configured service: its listener address and the handler
// built for its current settings.
type svc struct {
	name       string
	listen     string
	socketMode string
	spec       any // the service's config, compared on reload
	handler    ConnHandler
	// shutdown and close, when set, end the handler's own connections and
	// goroutines (the HTTP proxy's keep-alive connections and certificate
	// maintenance): shutdown gracefully, close at once.
	shutdown func(context.Context) error
	close    func() error
}

// release frees a handler that will not serve (a rejected or unchanged
// build).
func (sv svc) release() {
	if sv.close != nil {
		_ = sv.close()
	}
}

// key identifies a service's listener across reloads: its address, or for
// an ephemeral port (":0", tests) its name and address, since several
// services may ask for one.
func (sv svc) key() string { return svcKey(sv.name, sv.listen) }

func svcKey(name, listen string) string {
	if strings.HasSuffix(listen, ":0") {
		return name + "|" + listen
	}
	return listen
}

// listener is one bound address. Its handler can be swapped by a reload:
// new sessions use the new one, open sessions carry on with the old.
type listener struct {
	svc     svc // the service as last built, for shutdown and close
	name    string
	key     string // svc.key
	addr    string
	spec    any
	ln      net.Listener
	handler atomic.Pointer[handlerRef]
	// ctx is its sessions' context: cancelled when a reload removed the
	// listener and shutdown_grace has passed.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the accept loop returns
}

type handlerRef struct{ h ConnHandler }

// bind listens on svc's address.
func (s *Server) bind(sv svc) (*listener, error) {
	ln, err := Listen(sv.listen, sv.socketMode)
	if err != nil {
		return nil, err
	}
	l := &listener{name: sv.name, key: sv.key(), addr: sv.listen, spec: sv.spec, svc: sv, ln: ln, done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(s.sessCtx)
	l.handler.Store(&handlerRef{sv.handler})
	return l, nil
}

// serve starts l's accept loop.
func (s *Server) serve(l *listener) {
	s.log.Info("listening", zap.String("service", l.name), zap.String("listen", l.ln.Addr().String()))
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		defer close(l.done)
		s.accept(l)
	}()
}

// Listen binds "host:port" (TCP) or "unix:/path". A stale socket file left by
// a previous run is removed; any other existing file is an error. A unix
// socket gets mode (octal, "" for the umask's).
func Listen(addr, mode string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return net.Listen("tcp", addr)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: file exists and is not a socket", addr)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: another process is listening", addr)
		}
		_ = os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	if mode != "" {
		m, err := strconv.ParseUint(mode, 8, 32)
		if err == nil {
			err = os.Chmod(path, os.FileMode(m))
		}
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("listen %s: socket_mode %s: %w", addr, mode, err)
		}
	}
	return ln, nil
}

func (s *Server) accept(l *listener) {
	var backoff time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait, don't spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept failed", zap.String("service", l.name), zap.Error(err), zap.Duration("retry_in", backoff))
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		h := l.handler.Load().h
		s.sessions.Add(1)
		go func() {
			defer s.sessions.Done()
			id := newSessionID()
			// A bug in one session must not take down the others.
			defer func() {
				if r := recover(); r != nil {
					conn.Close()
					s.log.Error("session panicked", zap.String("service", l.name), zap.String("session_id", id),
						zap.Any("panic", r), zap.Stack("stack"))
				}
			}()
			_ = h.ServeConn(l.ctx, conn, id)
		}()
	}
}

// ownAddrs lists every address the process listens on — the admin
// server and each service — for the HTTP proxy, which never passes a
// tunnel through to them.
func (s *Server) ownAddrs() []net.Addr {
	var out []net.Addr
	if a := s.AdminAddr(); a != nil {
		out = append(out, a)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.listeners {
		out = append(out, l.ln.Addr())
	}
	return out
}

// newSessionID returns 96 random bits in hex.
func newSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
