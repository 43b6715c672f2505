package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fakeSource counts Fetch calls. Before each fetch it signals started (if
// set) and waits for gate (if set) or ctx.
type fakeSource struct {
	calls   atomic.Int64
	started chan struct{} // receives one value per Fetch, if not nil
	gate    chan struct{} // Fetch waits for it to be closed, if not nil
	fetch   func(n int64) (*Credential, error)
}

func (f *fakeSource) Fetch(ctx context.Context) (*Credential, error) {
	n := f.calls.Add(1)
	if f.started != nil {
		select {
		case f.started <- struct{}{}:
		default:
		}
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if f.fetch != nil {
		return f.fetch(n)
	}
	return userPassword("app", fmt.Sprintf("pw-%d", n)), nil
}

func userPassword(user, pw string) *Credential {
	return &Credential{Fields: map[string]Secret{"username": NewSecret(user), "password": NewSecret(pw)}}
}

// newTestStore builds a Store that is closed when the test ends.
func newTestStore(t *testing.T, sources map[string]Source, opts Options) *Store {
	t.Helper()
	s := NewStore(sources, opts)
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

// users is how many sessions hold the entry's current credential.
func users(t *testing.T, s *Store, name string) int {
	t.Helper()
	e := s.entryMap()[name]
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.current == nil {
		return 0
	}
	return len(e.current.users)
}

func acquire(t *testing.T, s *Store, name string) *Handle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := s.Acquire(ctx, name)
	if err != nil {
		t.Fatalf("Acquire(%q): %v", name, err)
	}
	t.Cleanup(h.Release)
	return h
}

func password(t *testing.T, h *Handle) string {
	t.Helper()
	s, ok := h.Credential.Field("password")
	if !ok {
		t.Fatalf("credential has no password")
	}
	return s.Reveal()
}

func TestStoreCaches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})
		h1 := acquire(t, s, "x")
		h2 := acquire(t, s, "x")
		if got := src.calls.Load(); got != 1 {
			t.Errorf("Fetch called %d times, want 1", got)
		}
		if h1.Credential != h2.Credential {
			t.Errorf("second Acquire got a different credential")
		}
		if h1.Name != "x" {
			t.Errorf("Handle.Name = %q, want x", h1.Name)
		}
		if got := password(t, h1); got != "pw-1" {
			t.Errorf("password = %q, want pw-1", got)
		}
	})
}

func TestStoreSingleFetchOnColdCache(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 500
		src := &fakeSource{started: make(chan struct{}, 1), gate: make(chan struct{})}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})

		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		handles := make([]*Handle, n)
		errs := make([]error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				handles[i], errs[i] = s.Acquire(ctx, "x")
			}()
		}
		<-src.started
		synctest.Wait() // every caller is queued behind the one fetch
		close(src.gate)
		wg.Wait()

		if got := src.calls.Load(); got != 1 {
			t.Errorf("Fetch called %d times for %d concurrent Acquires, want 1", got, n)
		}
		for i := range n {
			if errs[i] != nil {
				t.Fatalf("Acquire %d: %v", i, errs[i])
			}
			if handles[i].Credential != handles[0].Credential {
				t.Fatalf("Acquire %d got a different credential", i)
			}
		}
		if got := users(t, s, "x"); got != n {
			t.Errorf("users = %d, want %d", got, n)
		}
		for _, h := range handles {
			h.Release()
		}
		if got := users(t, s, "x"); got != 0 {
			t.Errorf("users after releasing all = %d, want 0", got)
		}
	})
}

func TestStoreErrors(t *testing.T) {
	sourceErr := errors.New("vault unreachable")
	tests := []struct {
		name     string
		sources  map[string]Source
		acquire  string
		wantText string
		wantIs   error
	}{
		{
			name:     "source error",
			sources:  map[string]Source{"x": &fakeSource{fetch: func(int64) (*Credential, error) { return nil, sourceErr }}},
			acquire:  "x",
			wantText: `credential "x" unavailable: vault unreachable`,
			wantIs:   sourceErr,
		},
		{
			name:     "unknown name",
			sources:  map[string]Source{"x": &fakeSource{}},
			acquire:  "nope",
			wantText: `credential "nope" unavailable: no such credential`,
			wantIs:   ErrUnknown,
		},
		{
			name:     "env var unset",
			sources:  map[string]Source{"x": NewEnv(map[string]string{"password": "CREDPROXY_TEST_NEVER_SET"})},
			acquire:  "x",
			wantText: `credential "x" unavailable: environment variable CREDPROXY_TEST_NEVER_SET is not set`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				s := newTestStore(t, tc.sources, Options{FetchTimeout: 50 * time.Millisecond})
				h, err := s.Acquire(context.Background(), tc.acquire)
				if err == nil {
					h.Release()
					t.Fatalf("Acquire: no error")
				}
				var ue *UnavailableError
				if !errors.As(err, &ue) {
					t.Fatalf("error %T %v is not *UnavailableError", err, err)
				}
				if ue.Name != tc.acquire {
					t.Errorf("UnavailableError.Name = %q, want %q", ue.Name, tc.acquire)
				}
				if got := err.Error(); got != tc.wantText {
					t.Errorf("error text = %q, want %q", got, tc.wantText)
				}
				if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
					t.Errorf("errors.Is(%v, %v) = false", err, tc.wantIs)
				}
			})
		})
	}
}

func TestStoreFailsFastThenRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{fetch: func(n int64) (*Credential, error) {
			if n == 1 {
				return nil, errors.New("transient")
			}
			return userPassword("app", "pw"), nil
		}}
		// A fetch retries only within FetchTimeout, shorter than its first backoff.
		s := newTestStore(t, map[string]Source{"x": src}, Options{FetchTimeout: 50 * time.Millisecond})
		if h, err := s.Acquire(context.Background(), "x"); err == nil {
			h.Release()
			t.Fatalf("first Acquire: no error")
		}
		// Right after a failure, sessions fail at once without a new fetch.
		h, err := s.Acquire(context.Background(), "x")
		if err == nil {
			h.Release()
		}
		if err == nil || err.Error() != `credential "x" unavailable: transient` {
			t.Errorf("Acquire during backoff: %v, want the last error", err)
		}
		if got := src.calls.Load(); got != 1 {
			t.Errorf("Fetch called %d times during backoff, want 1", got)
		}
		// Errors are not cached past the backoff: the Store retries on its
		// own when it has nothing valid to serve.
		time.Sleep(time.Minute)
		h = acquire(t, s, "x")
		if got := password(t, h); got != "pw" {
			t.Errorf("password = %q, want pw", got)
		}
		if got := src.calls.Load(); got != 2 {
			t.Errorf("Fetch called %d times, want 2", got)
		}
	})
}

func TestStoreWaitersShareFetchError(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{started: make(chan struct{}, 1), gate: make(chan struct{}),
			fetch: func(int64) (*Credential, error) { return nil, errors.New("boom") }}
		s := newTestStore(t, map[string]Source{"x": src}, Options{FetchTimeout: 300 * time.Millisecond})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()

		const n = 20
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				h, err := s.Acquire(ctx, "x")
				if err == nil {
					h.Release()
				}
				errs[i] = err
			}()
		}
		<-src.started
		close(src.gate)
		wg.Wait()
		for i, err := range errs {
			if err == nil || err.Error() != `credential "x" unavailable: boom` {
				t.Errorf("Acquire %d error = %v, want the source's error", i, err)
			}
		}
	})
}

func TestStoreContextCancelWhileWaiting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{started: make(chan struct{}, 1), gate: make(chan struct{})}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})

		first := make(chan error, 1)
		go func() {
			h, err := s.Acquire(context.Background(), "x")
			if err == nil {
				h.Release()
			}
			first <- err
		}()
		<-src.started

		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := s.Acquire(ctx, "x")
		if !errors.Is(err, context.Canceled) {
			t.Errorf("waiting Acquire with a cancelled context: error %v, want context.Canceled", err)
		}
		var ue *UnavailableError
		if !errors.As(err, &ue) {
			t.Errorf("error %T is not *UnavailableError", err)
		}

		close(src.gate)
		if err := <-first; err != nil {
			t.Errorf("fetching Acquire: %v", err)
		}
		if got := src.calls.Load(); got != 1 {
			t.Errorf("Fetch called %d times, want 1", got)
		}
	})
}

// The fetch belongs to the Store: the session that started it giving up
// does not fail the sessions waiting for it, nor cause a second fetch.
func TestStoreCallerCancelDoesNotCancelFetch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		started := make(chan struct{}, 1)
		gate := make(chan struct{})
		src := &fakeSource{started: started, gate: gate}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})

		ctx, cancel := context.WithCancel(context.Background())
		first := make(chan error, 1)
		go func() {
			h, err := s.Acquire(ctx, "x")
			if err == nil {
				h.Release()
			}
			first <- err
		}()
		<-started

		waiter := make(chan error, 1)
		go func() {
			wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer wcancel()
			h, err := s.Acquire(wctx, "x")
			if err == nil {
				h.Release()
			}
			waiter <- err
		}()
		cancel()
		if err := <-first; !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled caller: error %v, want context.Canceled", err)
		}
		close(gate)
		if err := <-waiter; err != nil {
			t.Errorf("waiter after the first caller gave up: %v", err)
		}
		if got := src.calls.Load(); got != 1 {
			t.Errorf("Fetch called %d times, want 1", got)
		}
	})
}

func TestStoreLeaseRefresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl = 90 * time.Second
		t0 := time.Now()
		src := &fakeSource{fetch: func(n int64) (*Credential, error) {
			c := userPassword(fmt.Sprintf("v-app-%d", n), fmt.Sprintf("pw-%d", n))
			c.Lease = Lease{ID: fmt.Sprintf("database/creds/app/%d", n), TTL: ttl, Renewable: true}
			return c, nil
		}}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})

		steps := []struct {
			name      string
			at        time.Duration // after t0
			wantCalls int64
			wantPW    string
		}{
			{"first acquire fetches", 0, 1, "pw-1"},
			{"cached before two thirds", 59 * time.Second, 1, "pw-1"},
			{"just before two thirds", 60*time.Second - time.Nanosecond, 1, "pw-1"},
			{"refetched at two thirds", 60 * time.Second, 2, "pw-2"},
			{"new lease is cached", 61 * time.Second, 2, "pw-2"},
			{"refetched at two thirds of the new lease", 120 * time.Second, 3, "pw-3"},
		}
		var first *Handle
		for _, st := range steps {
			time.Sleep(time.Until(t0.Add(st.at)))
			h := acquire(t, s, "x")
			if first == nil {
				first = h
			}
			if got := src.calls.Load(); got != st.wantCalls {
				t.Errorf("%s: Fetch calls = %d, want %d", st.name, got, st.wantCalls)
			}
			if got := password(t, h); got != st.wantPW {
				t.Errorf("%s: password = %q, want %q", st.name, got, st.wantPW)
			}
			h.Release() // each step is a session that has ended
		}
		// Sessions holding the first credential keep it across rotation.
		if got := password(t, first); got != "pw-1" {
			t.Errorf("first handle's password changed to %q", got)
		}
		if got := first.Credential.Lease.Issued; !got.Equal(t0) {
			t.Errorf("first lease Issued = %v, want the store's clock at fetch time %v", got, t0)
		}
	})
}

func TestStoreLeaseIssuedBySource(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		issued := time.Now().Add(-50 * time.Second) // the source read it 50s ago
		src := &fakeSource{fetch: func(n int64) (*Credential, error) {
			c := userPassword("app", fmt.Sprintf("pw-%d", n))
			c.Lease = Lease{ID: "l", TTL: 90 * time.Second, Issued: issued}
			if n > 1 {
				c.Lease.Issued = time.Now()
			}
			return c, nil
		}}
		s := newTestStore(t, map[string]Source{"x": src}, Options{})

		h := acquire(t, s, "x")
		if got := h.Credential.Lease.Issued; !got.Equal(issued) {
			t.Errorf("Issued = %v, want the source's %v", got, issued)
		}
		time.Sleep(10 * time.Second) // 60s after the source's Issued
		h = acquire(t, s, "x")
		if got := password(t, h); got != "pw-2" {
			t.Errorf("password = %q, want pw-2: the lease is past two thirds of its TTL", got)
		}
	})
}

// A source that returns a credential already past two thirds of its lease
// (issued long ago, or a lease id with TTL 0) must not make Acquire fetch in
// a loop that ignores ctx. The source gives up after maxCalls so that the
// test ends either way.
func TestStoreStaleOnArrivalDoesNotLoop(t *testing.T) {
	const maxCalls = 50
	tests := []struct {
		name  string
		lease Lease
	}{
		{"lease id with zero TTL", Lease{ID: "lease-without-ttl"}},
		{"issued long ago", Lease{ID: "old", TTL: time.Minute, Issued: time.Now().Add(-time.Hour)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				src := &fakeSource{}
				src.fetch = func(n int64) (*Credential, error) {
					if n > maxCalls {
						return nil, errors.New("source gave up")
					}
					c := userPassword("app", "pw")
					c.Lease = tc.lease
					return c, nil
				}
				s := newTestStore(t, map[string]Source{"x": src}, Options{})
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				h, err := s.Acquire(ctx, "x")
				if err == nil {
					h.Release()
				}
				if got := src.calls.Load(); got > 2 {
					t.Errorf("one Acquire called Fetch %d times (error %v); want at most 2", got, err)
				}
			})
		})
	}
}

func TestHandleReleaseIdempotent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newTestStore(t, map[string]Source{"x": &fakeSource{}}, Options{})
		ctx := context.Background()
		h1, err := s.Acquire(ctx, "x")
		if err != nil {
			t.Fatal(err)
		}
		h2, err := s.Acquire(ctx, "x")
		if err != nil {
			t.Fatal(err)
		}
		if got := users(t, s, "x"); got != 2 {
			t.Fatalf("users = %d, want 2", got)
		}
		h1.Release()
		h1.Release()
		h1.Release()
		if got := users(t, s, "x"); got != 1 {
			t.Errorf("users after releasing one handle three times = %d, want 1", got)
		}
		var wg sync.WaitGroup
		for range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				h2.Release()
			}()
		}
		wg.Wait()
		if got := users(t, s, "x"); got != 0 {
			t.Errorf("users after concurrent releases = %d, want 0", got)
		}
	})
}
