package postgres

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"sync"

	"github.com/jackc/pgproto3/v2"
)

// CancelRegistry maps the BackendKeyData credproxy issues to apps onto the
// upstream backends they stand for. Apps never see an upstream pid or secret;
// a CancelRequest with a key credproxy did not issue is dropped, as
// PostgreSQL drops one with an unknown key. One registry serves every
// Postgres service, since a client may send its cancel to any listener.
type CancelRegistry struct {
	mu      sync.Mutex
	targets map[uint64]cancelTarget
}

type cancelTarget struct {
	h   *Handler
	key pgproto3.BackendKeyData // the upstream's; zero when it sent none
	has bool
	// gate, when set, is held shared while a cancel is forwarded, so that
	// a backend going back to the pool can wait for it (pool.go).
	gate *sync.RWMutex
}

// NewCancelRegistry returns an empty registry.
func NewCancelRegistry() *CancelRegistry {
	return &CancelRegistry{targets: make(map[uint64]cancelTarget)}
}

func cancelKey(pid, secret uint32) uint64 { return uint64(pid)<<32 | uint64(secret) }

// cancelEntry is one issued key: what the app was given, and the target
// it stands for, which a migration changes.
type cancelEntry struct {
	r    *CancelRegistry
	k    uint64
	key  pgproto3.BackendKeyData
	gone sync.Once
}

// issue registers a target and returns its entry. The key's process id is
// the backend's own, so that what the app sees (its connection's PID, its
// own notifications) matches pg_backend_pid() and pg_stat_activity; the
// secret is credproxy's, and never the backend's. Two backends of
// different servers may share a process id: the secret tells them apart.
func (r *CancelRegistry) issue(t cancelTarget) *cancelEntry {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic("crypto/rand: " + err.Error()) // never fails on Linux
		}
		// A positive, non-zero pid, as clients print and compare it as one.
		pid := binary.BigEndian.Uint32(b[:4])&0x7fffffff | 1
		if t.has && t.key.ProcessID != 0 {
			pid = t.key.ProcessID
		}
		secret := binary.BigEndian.Uint32(b[4:])
		if t.has && secret == t.key.SecretKey {
			continue // never hand out the backend's own key
		}
		k := cancelKey(pid, secret)
		r.mu.Lock()
		if _, taken := r.targets[k]; !taken {
			r.targets[k] = t
			r.mu.Unlock()
			return &cancelEntry{r: r, k: k, key: pgproto3.BackendKeyData{ProcessID: pid, SecretKey: secret}}
		}
		r.mu.Unlock()
	}
}

// update points the entry's key at another target (a migration's new
// backend).
func (e *cancelEntry) update(t cancelTarget) {
	e.r.mu.Lock()
	e.r.targets[e.k] = t
	e.r.mu.Unlock()
}

// unregister voids the key when the session ends (once: the key may be
// issued again afterwards).
func (e *cancelEntry) unregister() {
	e.gone.Do(func() {
		e.r.mu.Lock()
		delete(e.r.targets, e.k)
		e.r.mu.Unlock()
	})
}

func (r *CancelRegistry) lookup(pid, secret uint32) (cancelTarget, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.targets[cancelKey(pid, secret)]
	return t, ok
}

// forward sends the upstream's own key to the upstream, over TLS when the
// service uses TLS. It reports whether a cancel was sent.
func (r *CancelRegistry) forward(ctx context.Context, pid, secret uint32) (bool, error) {
	r.mu.Lock()
	t, ok := r.targets[cancelKey(pid, secret)]
	if ok && t.has && t.gate != nil {
		// Taken before the registry is unlocked: a session that voids its
		// key then takes the gate alone waits for this cancel.
		t.gate.RLock()
		defer t.gate.RUnlock()
	}
	r.mu.Unlock()
	if !ok || !t.has {
		return false, nil
	}
	conn, err := t.h.dialUpstream(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	msg, _ := (&pgproto3.CancelRequest{ProcessID: t.key.ProcessID, SecretKey: t.key.SecretKey}).Encode(nil)
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	if _, err := conn.Write(msg); err != nil {
		return false, err
	}
	// Like libpq, wait for the server to close: the cancel has then been
	// delivered, not just queued.
	var b [1]byte
	_, _ = conn.Read(b[:])
	return true, nil
}
