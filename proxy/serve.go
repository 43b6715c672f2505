package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Serve accepts connections on ln and serves each with h on a goroutine
// of its own, under a fresh session id, until ln is closed or ctx ends
// (which closes ln). Cancelling ctx also ends the sessions: it is their
// context. Serve returns nil once ln is closed and every session it
// started has ended. Accept errors are handled as the engine's listeners
// handle them (see acceptLoop); a panic in h ends only its session.
//
// The engine serves its own listeners; Serve is for a handler run on
// its own (tests, benchmarks).
func Serve(ctx context.Context, ln net.Listener, h ConnHandler, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	var sessions sync.WaitGroup
	defer sessions.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	acceptLoop(ctx, ln, log, func(conn net.Conn) {
		sessions.Add(1)
		go func() {
			defer sessions.Done()
			serveConn(ctx, h, conn, log)
		}()
	})
	return nil
}

// acceptLoop accepts on ln until it is closed, handing each connection to
// serve, which must not block. Any other accept error (out of file
// descriptors, say) is logged and retried after a wait that doubles from
// 5ms up to a second, so the loop never spins; ctx ending cuts the wait
// short and ends the loop.
func acceptLoop(ctx context.Context, ln net.Listener, log *zap.Logger, serve func(net.Conn)) {
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Error("accept failed", zap.Error(err), zap.Duration("retry_in", backoff))
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
				continue
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		backoff = 0
		serve(conn)
	}
}

// serveConn serves conn with h under a fresh session id. A panic in h is
// logged (with fields, and the session id) and ends only this session.
func serveConn(ctx context.Context, h ConnHandler, conn net.Conn, log *zap.Logger, fields ...zap.Field) {
	id := NewSessionID()
	defer func() {
		if r := recover(); r != nil {
			conn.Close()
			log.Error("session panicked", append(fields, zap.String("session_id", id),
				zap.Any("panic", r), zap.Stack("stack"))...)
		}
	}()
	_ = h.ServeConn(ctx, conn, id)
}

// NewSessionID returns 96 random bits in hex: the session_id of the audit
// log and of every log line about the session.
func NewSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
