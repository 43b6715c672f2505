package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// key identifies a service's listener across reloads: its address, or for
// an ephemeral port (":0", tests) its name and address, since several
// services may ask for one.
func (sv Service) key() string { return svcKey(sv.Name, sv.Listen) }

func svcKey(name, listen string) string {
	if strings.HasSuffix(listen, ":0") {
		return name + "|" + listen
	}
	return listen
}

// listener is one bound address. Its handler can be swapped by a reload:
// new sessions use the new one, open sessions carry on with the old.
type listener struct {
	svc     Service // the service as last built, for shutdown and close
	name    string
	key     string // Service.key
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

// handlerRef is what a new session of the listener uses: the handler
// and the service's name, swapped together by a reload.
type handlerRef struct {
	h    ConnHandler
	name string
}

// bind listens on sv's address.
func (s *Server) bind(sv Service) (*listener, error) {
	ln, err := Listen(sv.Listen, sv.SocketMode)
	if err != nil {
		return nil, err
	}
	l := &listener{name: sv.Name, key: sv.key(), addr: sv.Listen, spec: sv.Spec, svc: sv, ln: ln, done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(s.sessCtx)
	l.handler.Store(&handlerRef{h: sv.Handler, name: sv.Name})
	return l, nil
}

// serve starts l's accept loop. s.mu is held.
func (s *Server) serve(l *listener) {
	s.log.Info("listening", zap.String("service", l.name), zap.String("listen", l.ln.Addr().String()))
	log := s.log.With(zap.String("service", l.name))
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		defer close(l.done)
		acceptLoop(l.ctx, l.ln, log, func(conn net.Conn) {
			ref := l.handler.Load()
			s.sessions.Add(1)
			go func() {
				defer s.sessions.Done()
				serveConn(l.ctx, ref.h, conn, s.log, zap.String("service", ref.name))
			}()
		})
	}()
}

// keepAliveFor is the TCP keep-alive of connections accepted on addr: off
// on a loopback address, where the kernel itself closes a dead peer's end
// and probes find nothing (and would cost four system calls per
// connection); Go's default (15 s) elsewhere, where a peer may vanish
// without a word.
func keepAliveFor(addr string) time.Duration {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	if ip := net.ParseIP(host); (ip != nil && ip.IsLoopback()) || host == "localhost" {
		return -1
	}
	return 0
}

// Listen binds "host:port" (TCP) or "unix:/path". A stale socket file left by
// a previous run is removed; any other existing file is an error. A unix
// socket gets mode (octal, "" for the umask's).
func Listen(addr, mode string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return (&net.ListenConfig{KeepAlive: keepAliveFor(addr)}).Listen(context.Background(), "tcp", addr)
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

// ownAddrs lists every address the process listens on — the admin
// server and each service — for protocols (Env.OwnAddrs): the HTTP proxy
// never passes a tunnel through to them.
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
