package postgres

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// The pool's timer logic, under testing/synctest: idle backends are
// pipes whose far end notes when credproxy closes them.

type poolFixture struct {
	t     *testing.T
	pool  *serverPool
	store *credentials.Store
}

func newPoolFixture(t *testing.T, pc config.PostgresPool) *poolFixture {
	t.Helper()
	h, err := NewHandler(Options{Service: config.Postgres{Name: "app", Upstream: "127.0.0.1:1",
		TLS: config.PostgresTLS{Mode: "disable"}, ConnectTimeout: config.Duration(10 * time.Second), Pool: &pc}})
	if err != nil {
		t.Fatal(err)
	}
	src, err := credentials.NewStatic(map[string]string{"username": "u", "password": "p"})
	if err != nil {
		t.Fatal(err)
	}
	f := &poolFixture{t: t, pool: h.pool, store: credentials.NewStore(map[string]credentials.Source{"s": src}, credentials.Options{})}
	t.Cleanup(func() {
		f.pool.close()
		f.store.Close(context.Background())
	})
	return f
}

// backend is an idle backend born at born, and a flag set once the pool
// has closed it.
func (f *poolFixture) backend(key poolKey, born time.Time) (*pooledConn, *atomic.Bool) {
	f.t.Helper()
	handle, err := f.store.Acquire(context.Background(), "s")
	if err != nil {
		f.t.Fatal(err)
	}
	near, far := net.Pipe()
	closed := new(atomic.Bool)
	go func() {
		_, _ = io.Copy(io.Discard, far) // Terminate, then EOF
		closed.Store(true)
		far.Close()
	}()
	return &pooledConn{up: &upstream{conn: near, born: born, txStatus: 'I'}, handle: handle, user: "u", key: key}, closed
}

func (f *poolFixture) key() poolKey {
	f.t.Helper()
	handle, err := f.store.Acquire(context.Background(), "s")
	if err != nil {
		f.t.Fatal(err)
	}
	defer handle.Release()
	return poolKey{cred: handle.Credential, params: startupKey(map[string]string{"database": "app"})}
}

func poolCfg(max int, idle, life, wait time.Duration) config.PostgresPool {
	return config.PostgresPool{MaxServerConnections: max, IdleTimeout: config.Duration(idle),
		MaxLifetime: config.Duration(life), ResetQuery: "DISCARD ALL", WaitTimeout: config.Duration(wait)}
}

func TestPoolIdleTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newPoolFixture(t, poolCfg(2, time.Minute, time.Hour, time.Second))
		key := f.key()
		if _, slot, err := f.pool.get(t.Context(), key); !slot || err != nil {
			t.Fatalf("first get: slot %v, %v", slot, err)
		}
		pc, closed := f.backend(key, time.Now())
		f.pool.put(pc)
		time.Sleep(59 * time.Second)
		synctest.Wait()
		if closed.Load() {
			t.Fatal("closed after 59s idle, idle_timeout 1m")
		}
		// Used again at 59s: its idle time starts over.
		got, _, err := f.pool.get(t.Context(), key)
		if got != pc || err != nil {
			t.Fatalf("get at 59s: %v, %v; want the idle backend", got, err)
		}
		f.pool.put(pc)
		time.Sleep(59 * time.Second)
		synctest.Wait()
		if closed.Load() {
			t.Fatal("closed 59s after its last use")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !closed.Load() {
			t.Fatal("still open 61s after its last use, idle_timeout 1m")
		}
		if f.pool.total != 0 || f.pool.idle.Len() != 0 {
			t.Errorf("after the idle close: %d places taken, %d idle; want 0, 0", f.pool.total, f.pool.idle.Len())
		}
	})
}

func TestPoolMaxLifetime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newPoolFixture(t, poolCfg(2, time.Hour, 10*time.Minute, time.Second))
		key := f.key()
		start := time.Now()

		// Idle at its max lifetime: closed by the janitor then.
		_, _, _ = f.pool.get(t.Context(), key)
		old, oldClosed := f.backend(key, start)
		f.pool.put(old)
		time.Sleep(10*time.Minute - time.Second)
		synctest.Wait()
		if oldClosed.Load() {
			t.Fatal("closed before max_lifetime")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !oldClosed.Load() {
			t.Fatal("idle past max_lifetime and still open")
		}

		// In use at its max lifetime: not handed out again, closed when
		// it comes back.
		_, _, _ = f.pool.get(t.Context(), key)
		busy, busyClosed := f.backend(key, time.Now().Add(-9*time.Minute))
		f.pool.put(busy)
		got, _, _ := f.pool.get(t.Context(), key)
		if got != busy {
			t.Fatal("a backend within max_lifetime was not reused")
		}
		time.Sleep(2 * time.Minute)
		f.pool.put(busy) // its session ends past max_lifetime
		synctest.Wait()
		if !busyClosed.Load() {
			t.Fatal("a backend that came back past max_lifetime was kept")
		}
		if f.pool.total != 0 {
			t.Errorf("%d places taken, want 0", f.pool.total)
		}
	})
}

func TestPoolWaiters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newPoolFixture(t, poolCfg(1, time.Hour, time.Hour, 5*time.Second))
		key := f.key()
		if _, slot, _ := f.pool.get(t.Context(), key); !slot {
			t.Fatal("no place for the first session")
		}

		// A waiter is handed the backend the moment it comes back.
		type result struct {
			pc   *pooledConn
			slot bool
			err  error
			took time.Duration
		}
		res := make(chan result, 1)
		go func() {
			start := time.Now()
			pc, slot, err := f.pool.get(context.Background(), key)
			res <- result{pc, slot, err, time.Since(start)}
		}()
		time.Sleep(3 * time.Second)
		pc, _ := f.backend(key, time.Now())
		f.pool.put(pc)
		r := <-res
		if r.pc != pc || r.err != nil || r.took != 3*time.Second {
			t.Fatalf("waiter got %+v; want the returned backend after 3s", r)
		}

		// Nothing comes back: the waiter gives up at wait_timeout with 53300.
		go func() {
			start := time.Now()
			pc, slot, err := f.pool.get(context.Background(), key)
			res <- result{pc, slot, err, time.Since(start)}
		}()
		r = <-res
		var ue *upstreamError
		if !errors.As(r.err, &ue) || ue.code != codeTooManyConnections || r.took != 5*time.Second {
			t.Fatalf("waiter past wait_timeout: %+v; want 53300 after 5s", r)
		}
		if f.pool.waiters.Len() != 0 {
			t.Errorf("%d waiters left queued", f.pool.waiters.Len())
		}

		// A waiter for another key gets the place of a backend that makes
		// way for it.
		other := poolKey{cred: key.cred, params: startupKey(map[string]string{"database": "other"})}
		go func() {
			pc, slot, err := f.pool.get(context.Background(), other)
			res <- result{pc, slot, err, 0}
		}()
		synctest.Wait()
		f.pool.put(pc)
		if r := <-res; !r.slot || r.pc != nil || r.err != nil {
			t.Fatalf("waiter for another key: %+v; want a place to log in", r)
		}
		if f.pool.total != 1 {
			t.Errorf("%d places taken, want 1", f.pool.total)
		}
	})
}

// TestCancelGate checks the order a pooled backend relies on: a session
// that voids its key and takes the backend's gate waits for a cancel
// already being forwarded with that key, and a cancel sent after it finds
// no key.
func TestCancelGate(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan struct{}, 2)
	release := make(chan struct{})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var b [16]byte
			_, _ = io.ReadFull(c, b[:])
			got <- struct{}{}
			<-release // the cancel is "being delivered" until then
			c.Close()
		}
	}()
	h, err := NewHandler(Options{Service: config.Postgres{Name: "app", Upstream: ln.Addr().String(),
		TLS: config.PostgresTLS{Mode: "disable"}}})
	if err != nil {
		t.Fatal(err)
	}
	up := &upstream{}
	e := h.cancels.issue(cancelTarget{h: h, key: pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: 7}, has: true, gate: up.cancelGate()})

	forwarded := make(chan bool, 1)
	go func() {
		sent, _ := h.cancels.forward(context.Background(), e.key.ProcessID, e.key.SecretKey)
		forwarded <- sent
	}()
	<-got // the cancel reached the upstream and holds the gate
	e.unregister()
	locked := make(chan struct{})
	go func() {
		up.cancelGate().Lock()
		close(locked)
		up.cancelGate().Unlock()
	}()
	select {
	case <-locked:
		t.Fatal("the gate was taken while a cancel was still being delivered")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	<-locked
	if !<-forwarded {
		t.Error("the cancel in flight was not reported sent")
	}
	if sent, _ := h.cancels.forward(context.Background(), e.key.ProcessID, e.key.SecretKey); sent {
		t.Error("a cancel with a voided key was forwarded")
	}
}

// TestPoolStaleCredential checks that idle backends of a credential the
// pool has seen replaced are closed and never handed out, and that a
// migrated session's backend is kept under its new credential.
func TestPoolStaleCredential(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newPoolFixture(t, poolCfg(4, time.Hour, time.Hour, time.Second))
		params := startupKey(map[string]string{"database": "app"})
		credA, credB := &credentials.Credential{}, &credentials.Credential{}
		keyA, keyB := poolKey{cred: credA, params: params}, poolKey{cred: credB, params: params}

		_, _, _ = f.pool.get(t.Context(), keyA)
		_, _, _ = f.pool.get(t.Context(), keyA)
		a1, a1Closed := f.backend(keyA, time.Now())
		f.pool.put(a1)
		// A session on B: A's idle backend goes.
		if pc, slot, _ := f.pool.get(t.Context(), keyB); pc != nil || !slot {
			t.Fatalf("get on a new credential: %v, %v; want a place to log in", pc, slot)
		}
		synctest.Wait()
		if !a1Closed.Load() {
			t.Error("an idle backend of the replaced credential is still open")
		}
		// A session that started on A ends on A: its backend is not kept.
		a2, a2Closed := f.backend(keyA, time.Now())
		f.pool.put(a2)
		synctest.Wait()
		if !a2Closed.Load() || f.pool.idle.Len() != 0 {
			t.Error("a backend of the replaced credential was kept")
		}
		// The session on B migrated to C: its backend is kept under C.
		credC := &credentials.Credential{}
		keyC := poolKey{cred: credC, params: params}
		f.pool.moved(credB, credC)
		c1, c1Closed := f.backend(keyC, time.Now())
		f.pool.put(c1)
		synctest.Wait()
		if c1Closed.Load() {
			t.Fatal("a migrated session's backend on the newest credential was closed")
		}
		if pc, _, _ := f.pool.get(t.Context(), keyC); pc != c1 {
			t.Errorf("get on C: %v, want the migrated session's backend", pc)
		}
		if f.pool.total != 1 {
			t.Errorf("%d places taken, want 1 (the backend in use)", f.pool.total)
		}
		f.pool.put(c1) // for the pool's close to end it
	})
}

// TestPoolResetOwnsBackend: once a session's relay has ended and its
// backend is being reset for the pool, a callback of the relay's that
// still runs — the shutdown's terminate and the cut after it, the
// credential's end — must not touch the backend. Before the relay handed
// its backend back, such a callback set a read deadline of "now" on it
// (wake) or closed it (cut): the reset's read failed with an i/o timeout
// and a clean backend was closed instead of being reused
// (TestPoolStartupParametersKey's flake, at the proxy's shutdown). The
// hook runs the callback exactly while the reset waits for its answer.
func TestPoolResetOwnsBackend(t *testing.T) {
	for _, tc := range []struct {
		name     string
		callback func(r *relay)
	}{
		{"shutdown", func(r *relay) {
			// What run's context.AfterFunc does, and its timer later.
			r.terminate(fatal(codeAdminShutdown, "credproxy: terminating connection because credproxy is shutting down"))
			r.cut()
		}},
		{"credential end", func(r *relay) {
			// What watch's OnEnd does.
			r.terminate(fatal(codeAdminShutdown, "credproxy: credential lease expired"))
		}},
		{"wake", func(r *relay) { r.wake() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answer := make(chan struct{}) // the fake upstream answers the reset once closed
			var fired sync.Once
			testHookResetSent = func(r *relay) {
				fired.Do(func() {
					tc.callback(r)
					close(answer)
				})
			}
			t.Cleanup(func() { testHookResetSent = nil }) // after the proxy's cleanup, which waits for its sessions
			up := startUpstream(t, func(u *upConn) {
				if u.ready(true) {
					u.serve(func(m pgproto3.FrontendMessage) {
						if q, ok := m.(*pgproto3.Query); ok && q.String == "DISCARD ALL" {
							<-answer
						}
					})
				}
			})
			svc := testService(up.addr)
			pc := poolCfg(2, time.Hour, time.Hour, 5*time.Second)
			svc.Pool = &pc
			svc.ConnectTimeout = config.Duration(10 * time.Second)
			p := startProxy(t, svc)
			t.Cleanup(func() { p.h.Close() }) // the pool's janitor

			session := func() {
				t.Helper()
				c := dialProxy(t, p.addr)
				c.connect(map[string]string{"user": "app", "database": "app"})
				c.send(&pgproto3.Query{String: "SELECT 1"})
				for m := c.mustNext(); m.typ != 'Z'; m = c.mustNext() {
				}
				c.send(&pgproto3.Terminate{})
				c.expectClosed()
				if err := p.wait(t); err != nil {
					t.Fatalf("session: %v", err)
				}
			}
			session()
			p.h.pool.mu.Lock()
			idle := p.h.pool.idle.Len()
			p.h.pool.mu.Unlock()
			if idle != 1 {
				t.Fatalf("after the first session %d backends idle, want 1 (logs: %v)", idle, p.logs.FilterMessage("upstream connection not reused").All())
			}
			session()
			if n := up.connCount(); n != 1 {
				t.Errorf("the upstream saw %d connections, want 1: the second session gets the first one's backend", n)
			}
		})
	}
}
