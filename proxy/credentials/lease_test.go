package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// leasingSource hands out leased credentials with Vault's renewal rules:
// a renewal asks for increment from now, capped at issue time + maxTTL.
type leasingSource struct {
	ttl, maxTTL time.Duration

	mu      sync.Mutex
	n       int
	issued  map[string]time.Time
	revoked map[string]bool
	renews  int
	down    bool
}

func newLeasingSource(ttl, maxTTL time.Duration) *leasingSource {
	return &leasingSource{ttl: ttl, maxTTL: maxTTL, issued: map[string]time.Time{}, revoked: map[string]bool{}}
}

func (l *leasingSource) Fetch(ctx context.Context) (*Credential, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return nil, errors.New("vault unreachable")
	}
	l.n++
	id := fmt.Sprintf("database/creds/app/%d", l.n)
	l.issued[id] = time.Now()
	c := userPassword(fmt.Sprintf("v-app-%d", l.n), "pw")
	c.Lease = Lease{ID: id, TTL: l.ttl, Renewable: true, Issued: time.Now()}
	return c, nil
}

func (l *leasingSource) Renew(ctx context.Context, lease Lease, inc time.Duration) (Lease, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return lease, errors.New("vault unreachable")
	}
	if l.revoked[lease.ID] {
		return lease, errors.New("lease not found")
	}
	l.renews++
	limit := l.issued[lease.ID].Add(l.maxTTL)
	ttl := inc
	if left := time.Until(limit); ttl > left {
		ttl = left.Truncate(time.Millisecond)
	}
	lease.TTL, lease.Issued = ttl, time.Now()
	return lease, nil
}

func (l *leasingSource) Revoke(ctx context.Context, lease Lease) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.revoked[lease.ID] = true
	return nil
}

func (l *leasingSource) stats() (fetches, renews, revoked int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n, l.renews, len(l.revoked)
}

func (l *leasingSource) setDown(v bool) {
	l.mu.Lock()
	l.down = v
	l.mu.Unlock()
}

func leaseStore(t *testing.T, src Source) *Store {
	t.Helper()
	s := NewStore(map[string]Source{"db": src}, Options{FetchTimeout: 300 * time.Millisecond, RevokeUnused: true, RevokeOnClose: true})
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

// eventually polls cond for up to 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLeaseRenewedWhileInUse(t *testing.T) {
	src := newLeasingSource(300*time.Millisecond, time.Hour)
	s := leaseStore(t, src)
	h := acquire(t, s, "db")
	// Several TTLs later the same credential is still served and renewed.
	time.Sleep(time.Second)
	_, renews, revoked := src.stats()
	if renews < 2 {
		t.Errorf("renewals = %d, want at least 2 over three TTLs", renews)
	}
	if revoked != 0 {
		t.Errorf("a lease in use was revoked")
	}
	h2 := acquire(t, s, "db")
	if h2.Credential != h.Credential {
		t.Errorf("new session got a different credential while the renewed one is fresh")
	}
}

func TestUnusedLeaseRetiredAndRevoked(t *testing.T) {
	src := newLeasingSource(300*time.Millisecond, time.Hour)
	s := leaseStore(t, src)
	h := acquire(t, s, "db")
	h.Release()
	eventually(t, "revocation of the unused lease", func() bool { _, _, r := src.stats(); return r == 1 })
	h2 := acquire(t, s, "db")
	if h2.Credential == h.Credential {
		t.Error("a retired credential was handed out again")
	}
}

func TestMaxTTLRotatesAndEndsSessions(t *testing.T) {
	src := newLeasingSource(300*time.Millisecond, 700*time.Millisecond)
	s := leaseStore(t, src)
	h := acquire(t, s, "db")
	ended := make(chan time.Time, 1)
	h.OnEnd(func() { ended <- time.Now() })
	start := time.Now()
	select {
	case at := <-ended:
		// Before the lease's hard end (issue + max TTL), not long before.
		if d := at.Sub(start); d > 700*time.Millisecond || d < 300*time.Millisecond {
			t.Errorf("session ended after %v; want shortly before the 700ms max TTL", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("session on a lease at its max TTL was never ended")
	}
	// New sessions already got a fresh credential.
	h2 := acquire(t, s, "db")
	if h2.Credential == h.Credential {
		t.Error("new session got the credential past its max TTL")
	}
}

func TestServesValidCacheWhileSourceDown(t *testing.T) {
	src := newLeasingSource(4*time.Second, time.Hour)
	s := leaseStore(t, src)
	h := acquire(t, s, "db")
	h.Release()
	src.setDown(true)
	// Past two thirds of the TTL the store wants a new credential, cannot
	// get one (300ms of retries), and serves the cached one while it is
	// valid (until 500ms before expiry).
	time.Sleep(2800 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h2, err := s.Acquire(ctx, "db")
	if err != nil {
		t.Fatalf("Acquire while the source is down with a valid cache: %v", err)
	}
	if h2.Credential != h.Credential {
		t.Error("got a different credential although the source is down")
	}
	h2.Release()
}

func TestSourceDownFailsFastThenRecovers(t *testing.T) {
	src := newLeasingSource(time.Hour, time.Hour)
	src.setDown(true)
	s := leaseStore(t, src)
	ctx := context.Background()
	_, err := s.Acquire(ctx, "db")
	var ue *UnavailableError
	if !errors.As(err, &ue) {
		t.Fatalf("Acquire with the source down = %v, want *UnavailableError", err)
	}
	// Within the backoff window, failures are immediate.
	start := time.Now()
	if _, err := s.Acquire(ctx, "db"); err == nil {
		t.Fatal("Acquire succeeded with the source down")
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Errorf("second Acquire took %v; want an immediate failure during backoff", d)
	}
	src.setDown(false)
	eventually(t, "recovery after the source returns", func() bool {
		h, err := s.Acquire(ctx, "db")
		if err != nil {
			return false
		}
		h.Release()
		return true
	})
}

func TestInvalidateFetchesFresh(t *testing.T) {
	src := newLeasingSource(time.Hour, time.Hour)
	s := leaseStore(t, src)
	h := acquire(t, s, "db")
	h.Invalidate()
	h.Release()
	h2 := acquire(t, s, "db")
	if h2.Credential == h.Credential {
		t.Error("an invalidated credential was handed out again")
	}
	eventually(t, "revocation of the invalidated lease", func() bool { _, _, r := src.stats(); return r == 1 })
}

func TestCloseRevokesEveryLease(t *testing.T) {
	src := newLeasingSource(time.Hour, time.Hour)
	s := NewStore(map[string]Source{"db": src}, Options{RevokeOnClose: true})
	h := acquire(t, s, "db")
	h.Invalidate() // rotated out but still in use
	acquire(t, s, "db")
	s.Close(context.Background())
	if _, _, revoked := src.stats(); revoked != 2 {
		t.Errorf("revoked %d leases at Close, want 2", revoked)
	}
}

func TestWarmReportsFailures(t *testing.T) {
	src := newLeasingSource(time.Hour, time.Hour)
	src.setDown(true)
	s := NewStore(map[string]Source{"db": src, "ok": NewEnv(nil)}, Options{FetchTimeout: 200 * time.Millisecond})
	defer s.Close(context.Background())
	got := s.Warm(context.Background())
	if len(got) != 1 || got["db"] == nil {
		t.Errorf("Warm = %v, want one failure for db", got)
	}
	if r := s.Ready(); r["db"] == nil || r["ok"] != nil {
		t.Errorf("Ready = %v, want db not ready and ok ready", r)
	}
}
