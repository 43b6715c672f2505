package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
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
	hang    bool   // Fetch and Renew wait for their context to end, as a Vault that does not answer
	owner   *Owner // given to new leases
}

// errUnreachable is what the Vault source returns when Vault is down.
var errUnreachable = &Error{Kind: KindUnreachable, Msg: "vault unreachable"}

func newLeasingSource(ttl, maxTTL time.Duration) *leasingSource {
	return &leasingSource{ttl: ttl, maxTTL: maxTTL, issued: map[string]time.Time{}, revoked: map[string]bool{}}
}

// hung, when the source hangs, waits for ctx to end and returns the error
// a Vault that does not answer gives; otherwise nil at once.
func (l *leasingSource) hung(ctx context.Context) error {
	l.mu.Lock()
	hang := l.hang
	l.mu.Unlock()
	if !hang {
		return nil
	}
	<-ctx.Done()
	return &Error{Kind: KindUnreachable, Msg: "vault unreachable", Err: ctx.Err()}
}

func (l *leasingSource) Fetch(ctx context.Context) (*Credential, error) {
	if err := l.hung(ctx); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return nil, errUnreachable
	}
	l.n++
	id := fmt.Sprintf("database/creds/app/%d", l.n)
	l.issued[id] = time.Now()
	c := userPassword(fmt.Sprintf("v-app-%d", l.n), "pw")
	c.Lease = Lease{ID: id, TTL: l.ttl, Renewable: true, Issued: time.Now(), Owner: l.owner}
	return c, nil
}

func (l *leasingSource) Renew(ctx context.Context, lease Lease, inc time.Duration) (Lease, error) {
	if err := l.hung(ctx); err != nil {
		return lease, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return lease, errUnreachable
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

func (l *leasingSource) setOwner(o *Owner) {
	l.mu.Lock()
	l.owner = o
	l.mu.Unlock()
}

// revokeOutOfBand revokes a lease behind the Store's back, as an operator
// running vault lease revoke does.
func (l *leasingSource) revokeOutOfBand(id string) {
	l.mu.Lock()
	l.revoked[id] = true
	l.mu.Unlock()
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

func TestLeaseRenewedWhileInUse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(300*time.Millisecond, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		// Over three TTLs the same credential is served and renewed at each
		// two thirds: 200ms, 400ms, 600ms, 800ms, 1000ms.
		time.Sleep(time.Second)
		synctest.Wait()
		_, renews, revoked := src.stats()
		if renews != 5 {
			t.Errorf("renewals = %d, want 5 (every 200ms over 1s)", renews)
		}
		if revoked != 0 {
			t.Errorf("a lease in use was revoked")
		}
		h2 := acquire(t, s, "db")
		if h2.Credential != h.Credential {
			t.Errorf("new session got a different credential while the renewed one is fresh")
		}
	})
}

func TestUnusedLeaseRetiredAndRevoked(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(300*time.Millisecond, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		h.Release()
		// Unused past two thirds of its TTL, the lease stays current (a
		// fallback) until a new session rotates it; then it is revoked.
		time.Sleep(200 * time.Millisecond)
		h2 := acquire(t, s, "db")
		if h2.Credential == h.Credential {
			t.Error("a stale credential was handed out again")
		}
		synctest.Wait()
		if _, _, r := src.stats(); r != 1 {
			t.Errorf("revoked %d leases, want the unused one", r)
		}
	})
}

func TestMaxTTLRotatesAndEndsSessions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(300*time.Millisecond, 700*time.Millisecond)
		s := leaseStore(t, src)
		start := time.Now()
		h := acquire(t, s, "db")
		ended := make(chan time.Time, 1)
		h.OnEnd(func() { ended <- time.Now() })
		// Renewed at 200ms (to 500ms) and 400ms (to 700ms); the renewal at
		// 600ms is capped to 100ms: the last one. The session ends a
		// margin (25ms) before the hard end at 700ms.
		at := <-ended
		if d := at.Sub(start); d != 675*time.Millisecond {
			t.Errorf("session ended after %v; want 675ms, shortly before the 700ms max TTL", d)
		}
		// New sessions already got a fresh credential.
		h2 := acquire(t, s, "db")
		if h2.Credential == h.Credential {
			t.Error("new session got the credential past its max TTL")
		}
	})
}

// A lease in use whose renewals fail until its end time gets one more
// renewal attempt there, while it has not expired; when that succeeds its
// sessions live on.
func TestLateRenewalSavesSessions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Second, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		ended := make(chan struct{})
		h.OnEnd(func() { close(ended) })
		// Renewal is due at 667ms; the source is down then, and the retry
		// 500ms later is brought forward to the end time, 750ms (a 250ms
		// margin before expiry). The source is back at 700ms.
		src.setDown(true)
		time.Sleep(700 * time.Millisecond)
		src.setDown(false)
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		select {
		case <-ended:
			t.Fatal("the session was ended although the lease could still be renewed")
		default:
		}
		if _, renews, _ := src.stats(); renews != 1 {
			t.Errorf("successful renewals = %d, want 1 (the late one)", renews)
		}
		// When the late renewal fails as well, the session ends at once.
		src.setDown(true)
		time.Sleep(2 * time.Second)
		select {
		case <-ended:
		default:
			t.Fatal("the session outlived a lease that could not be renewed")
		}
	})
}

func TestServesValidCacheWhileSourceDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(4*time.Second, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		h.Release()
		src.setDown(true)
		// Past two thirds of the TTL the store wants a new credential,
		// cannot get one (300ms of retries), and serves the cached one while
		// it is valid (until 200ms before expiry).
		time.Sleep(2800 * time.Millisecond)
		h2, err := s.Acquire(context.Background(), "db")
		if err != nil {
			t.Fatalf("Acquire while the source is down with a valid cache: %v", err)
		}
		if h2.Credential != h.Credential {
			t.Error("got a different credential although the source is down")
		}
		h2.Release()
		// Past the end of its validity it is no longer served.
		time.Sleep(time.Second)
		if h3, err := s.Acquire(context.Background(), "db"); err == nil {
			h3.Release()
			t.Error("Acquire served a credential within its expiry margin")
		}
	})
}

// A source that hangs rather than fails (packets dropped, a stalled Vault)
// must not cost a new session the valid credential in the cache: when the
// session can wait no longer, it gets that one.
func TestServesValidCacheWhenFetchOutlastsCaller(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(4*time.Second, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		h.Release()
		src.mu.Lock()
		src.hang = true
		src.mu.Unlock()
		time.Sleep(2800 * time.Millisecond) // stale: the store wants a new one
		// The first caller starts the fetch, the second finds it running.
		for range 2 {
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			h2, err := s.Acquire(ctx, "db")
			cancel()
			if err != nil {
				t.Fatalf("Acquire with a valid cache while the source hangs: %v", err)
			}
			if h2.Credential != h.Credential {
				t.Error("got a different credential although the source hangs")
			}
			h2.Release()
		}
		// Expired: the caller's deadline ends the wait with an error.
		time.Sleep(time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if h3, err := s.Acquire(ctx, "db"); err == nil {
			h3.Release()
			t.Error("Acquire served a credential within its expiry margin")
		}
	})
}

func TestSourceDownFailsFastThenRecovers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Hour, time.Hour)
		src.setDown(true)
		s := leaseStore(t, src)
		ctx := context.Background()
		_, err := s.Acquire(ctx, "db")
		var ue *UnavailableError
		if !errors.As(err, &ue) {
			t.Fatalf("Acquire with the source down = %v, want *UnavailableError", err)
		}
		// Within the backoff window, failures are immediate: no time passes.
		start := time.Now()
		if _, err := s.Acquire(ctx, "db"); err == nil {
			t.Fatal("Acquire succeeded with the source down")
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("second Acquire took %v; want an immediate failure during backoff", d)
		}
		src.setDown(false)
		// The Store retries on its own after the 1s backoff.
		time.Sleep(time.Second)
		synctest.Wait()
		if fetches, _, _ := src.stats(); fetches != 1 {
			t.Errorf("successful fetches = %d after the backoff, want 1", fetches)
		}
		h := acquire(t, s, "db")
		h.Release()
	})
}

func TestInvalidateFetchesFresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Hour, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		h.Invalidate()
		h.Release()
		h2 := acquire(t, s, "db")
		if h2.Credential == h.Credential {
			t.Error("an invalidated credential was handed out again")
		}
		synctest.Wait()
		if _, _, r := src.stats(); r != 1 {
			t.Errorf("revoked %d leases, want the invalidated one", r)
		}
	})
}

func TestCloseRevokesEveryLease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Hour, time.Hour)
		s := NewStore(map[string]Source{"db": src}, Options{RevokeOnClose: true})
		h := acquire(t, s, "db")
		h.Invalidate() // rotated out but still in use
		acquire(t, s, "db")
		s.Close(context.Background())
		if _, _, revoked := src.stats(); revoked != 2 {
			t.Errorf("revoked %d leases at Close, want 2", revoked)
		}
	})
}

func TestWarmReportsFailures(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
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
	})
}

// retirement records what a session was told about its credential.
type retirement struct {
	retired  chan time.Time // the deadline, when told to move
	ended    chan time.Time // when told to end
	deadline time.Time
}

func watch(h *Handle) *retirement {
	r := &retirement{retired: make(chan time.Time, 1), ended: make(chan time.Time, 1)}
	h.OnRetire(func(d time.Time) { r.retired <- d })
	h.OnEnd(func() { r.ended <- time.Now() })
	return r
}

// told reports whether the session was told to move, and the deadline.
func (r *retirement) told() (time.Time, bool) {
	select {
	case d := <-r.retired:
		r.deadline = d
		return d, true
	default:
		return r.deadline, !r.deadline.IsZero()
	}
}

func (r *retirement) endedAt() (time.Time, bool) {
	select {
	case at := <-r.ended:
		return at, true
	default:
		return time.Time{}, false
	}
}

// At its max TTL a lease's sessions are told to move, with the time they
// will be ended as the deadline, and are ended then.
func TestMaxTTLRetiresSessionsBeforeEnding(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(300*time.Millisecond, 700*time.Millisecond)
		s := leaseStore(t, src)
		start := time.Now()
		r := watch(acquire(t, s, "db"))
		time.Sleep(599 * time.Millisecond)
		synctest.Wait()
		if _, ok := r.told(); ok {
			t.Fatal("told to move before the lease reached its max TTL")
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		d, ok := r.told()
		if !ok {
			t.Fatal("not told to move when the renewal at 600ms was capped")
		}
		if got := d.Sub(start); got != 675*time.Millisecond {
			t.Errorf("deadline %v after start, want 675ms", got)
		}
		time.Sleep(75 * time.Millisecond)
		synctest.Wait()
		if at, ok := r.endedAt(); !ok || !at.Equal(d) {
			t.Errorf("ended %v (%v), want at the deadline %v", at, ok, d)
		}
	})
}

// A lease revoked behind credproxy's back: the next renewal is refused, and
// its sessions are told at once to move; new sessions get a fresh one.
func TestRenewalRefusedRetires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(300*time.Millisecond, time.Hour)
		s := leaseStore(t, src)
		h := acquire(t, s, "db")
		r := watch(h)
		src.revokeOutOfBand(h.Credential.Lease.ID)
		time.Sleep(200 * time.Millisecond) // the renewal
		synctest.Wait()
		if _, ok := r.told(); !ok {
			t.Fatal("sessions on a lease Vault refused to renew were not told to move")
		}
		if h2 := acquire(t, s, "db"); h2.Credential == h.Credential {
			t.Error("a new session got the revoked lease")
		}
	})
}

// A credential the upstream refused: the other sessions on it move too.
func TestInvalidateRetiresSessions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Hour, time.Hour)
		s := leaseStore(t, src)
		h1 := acquire(t, s, "db")
		h2 := acquire(t, s, "db")
		r := watch(h1)
		h2.Invalidate()
		if _, ok := r.told(); !ok {
			t.Fatal("a session on an invalidated credential was not told to move")
		}
		// Registering after the fact is told at once.
		late := watch(h2)
		if _, ok := late.told(); !ok {
			t.Error("OnRetire on a retired credential did not fire at once")
		}
	})
}

// A lease cannot outlive the Vault token that created it. While no newer
// token exists its sessions stay (moving them would only get another lease
// under the same token), and are ended a margin before the token's end;
// once a newer token exists they are told to move a lease TTL before it.
func TestOwnerEndRetiresAndEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Minute, time.Hour)
		owner := NewOwner()
		src.setOwner(owner)
		s := leaseStore(t, src)
		start := time.Now()
		h := acquire(t, s, "db")
		r := watch(h)

		owner.Ends(start.Add(100 * time.Second))
		time.Sleep(30 * time.Second)
		synctest.Wait()
		if _, ok := r.told(); ok {
			t.Fatal("told to move although no newer token exists")
		}
		if h2 := acquire(t, s, "db"); h2.Credential != h.Credential {
			t.Error("a new session got another lease although no newer token exists")
		}

		// A newer token: leases of the old one retire ownerLead (the lease
		// TTL, 1m) before its end at 100s, at 40s. Still in use, the lease
		// is renewed up to the token's end meanwhile.
		src.setOwner(NewOwner())
		owner.Supersede()
		time.Sleep(10*time.Second - time.Nanosecond)
		synctest.Wait()
		if _, ok := r.told(); ok {
			t.Fatal("told to move before ownerLead")
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		d, ok := r.told()
		if !ok {
			t.Fatal("not told to move once a newer token exists")
		}
		// The margin for a 1m lease is 3s: ended at 97s, before the token.
		if got := d.Sub(start); got != 97*time.Second {
			t.Errorf("deadline %v after start, want 97s", got)
		}
		h3 := acquire(t, s, "db")
		if h3.Credential == h.Credential || h3.Credential.Lease.Owner == owner {
			t.Error("a new session got a lease under the ending token")
		}
		// Still renewed while in use: at 80s the lease would last to 140s,
		// but its token ends at 100s, and for those last 20s the margin is
		// 1s: the session is ended at 99s.
		time.Sleep(59 * time.Second)
		synctest.Wait()
		if at, ok := r.endedAt(); !ok || at.Sub(start) != 99*time.Second {
			t.Errorf("ended at %v (%v), want 99s after start", at.Sub(start), ok)
		}
		if _, ok := watch(h3).told(); ok {
			t.Error("the lease under the new token was retired")
		}
	})
}

// A token revoked out of band took its leases with it: sessions are told
// to move at once; their deadline stays the lease's own.
func TestOwnerGoneRetiresAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newLeasingSource(time.Minute, time.Hour)
		owner := NewOwner()
		src.setOwner(owner)
		s := leaseStore(t, src)
		start := time.Now()
		r := watch(acquire(t, s, "db"))
		time.Sleep(time.Second)
		src.setOwner(NewOwner())
		owner.Gone()
		synctest.Wait()
		d, ok := r.told()
		if !ok {
			t.Fatal("not told to move when the token was revoked")
		}
		if got := d.Sub(start); got != 57*time.Second {
			t.Errorf("deadline %v after start, want the lease's own 57s", got)
		}
	})
}
