package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// UnavailableError says a named credential could not be served. Its text is
// safe to show a client: it names the credential and the cause, never a value.
type UnavailableError struct {
	Name string
	Err  error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("credential %q unavailable: %v", e.Name, e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// ErrUnknown is returned for a credential name the Store was not given.
var ErrUnknown = errors.New("no such credential")

// Refresher is implemented by sources whose unleased credentials (KV reads)
// should be re-read periodically.
type Refresher interface {
	RefreshInterval() time.Duration
}

// Observer hears about the Store's work, for metrics. Every method must be
// cheap and safe for concurrent use; a nil Observer is allowed.
type Observer interface {
	Fetched(name string, d time.Duration, err error)
	Renewed(name string, err error)
	Rotated(name string, err error)
	LeasesActive(name string, n int)
}

// Options tune a Store. The zero value serves static and env sources.
type Options struct {
	Logger *zap.Logger
	// FetchTimeout bounds one fetch, retries included, and so how long a new
	// session waits for a credential that is not cached (default 5s).
	FetchTimeout time.Duration
	// RevokeUnused revokes a lease once it was rotated out and its last
	// session ended.
	RevokeUnused bool
	// RevokeOnClose revokes every lease still held when the Store closes.
	RevokeOnClose bool
	Observer      Observer
}

// Store serves named credentials to sessions and manages their leases.
//
// New sessions share the credential last fetched while it is fresh: an
// unleased credential always (re-read in the background every refresh
// interval when its source says so), a leased one until two thirds of its
// lease have passed or until it can no longer be renewed past its max TTL.
// After that the next session causes a new fetch: rotation costs no failed
// connection. Concurrent requests on a cold cache cause a single fetch.
//
// A lease with sessions is renewed at two thirds of its TTL; a lease with
// none is retired then (revoked when RevokeUnused). When a lease cannot be
// renewed any further, its sessions are ended just before it expires, since
// the database would drop the role anyway.
//
// When the source fails, sessions keep getting a cached credential while it
// is valid; otherwise they fail at once until a retry (with backoff) is due.
type Store struct {
	opts Options
	log  *zap.Logger
	// entries is replaced whole by Update (copy on write), so Acquire reads
	// it without a lock.
	entries atomic.Pointer[map[string]*entry]
	// retired holds entries removed by Update whose leases still need
	// revoking at Close.
	mu      sync.Mutex
	retired []*entry

	ctx    context.Context // ends background work at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewStore builds a Store over the named sources.
func NewStore(sources map[string]Source, opts Options) *Store {
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	s := &Store{opts: opts, log: opts.Logger.Named("credentials")}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	entries := make(map[string]*entry, len(sources))
	for name, src := range sources {
		e := &entry{name: name, all: make(map[*held]struct{})}
		e.setSource(src)
		entries[name] = e
	}
	s.entries.Store(&entries)
	return s
}

// setSource installs src; e.mu is held or e is not shared yet.
func (e *entry) setSource(src Source) {
	e.src = src
	e.leaser, _ = src.(Leaser)
	e.refresh = 0
	if r, ok := src.(Refresher); ok {
		e.refresh = r.RefreshInterval()
	}
}

func (s *Store) entryMap() map[string]*entry { return *s.entries.Load() }

// Update applies a reloaded config: names not in sources are removed, new
// names added, and the names in changed get their new source. Sessions
// already open keep the credential they have (and its lease lifecycle);
// new sessions get one from the new source.
func (s *Store) Update(sources map[string]Source, changed map[string]bool) {
	old := s.entryMap()
	next := make(map[string]*entry, len(sources))
	for name, src := range sources {
		e, ok := old[name]
		if !ok {
			e = &entry{name: name, all: make(map[*held]struct{})}
			e.setSource(src)
			next[name] = e
			continue
		}
		if changed[name] {
			e.mu.Lock()
			e.setSource(src)
			if cur := e.current; cur != nil {
				e.current = nil
				cur.signal()
			}
			e.lastErr, e.failures, e.retryAt = nil, 0, time.Time{}
			e.mu.Unlock()
			s.log.Info("credential source changed; new sessions use the new one", zap.String("credential", name))
		}
		next[name] = e
	}
	s.mu.Lock()
	for name, e := range old {
		if _, ok := next[name]; !ok {
			e.mu.Lock()
			if cur := e.current; cur != nil {
				e.current = nil
				cur.signal()
			}
			e.mu.Unlock()
			s.retired = append(s.retired, e)
		}
	}
	s.mu.Unlock()
	s.entries.Store(&next)
}

type entry struct {
	name    string
	src     Source
	leaser  Leaser        // nil when the source has no leases
	refresh time.Duration // re-read interval for unleased credentials; 0: never

	mu       sync.Mutex
	current  *held              // what new sessions get; nil until the first fetch
	all      map[*held]struct{} // every leased credential not yet ended
	inflight chan struct{}      // closed when the running fetch ends
	lastErr  error              // the last fetch's error
	failures int                // consecutive failed fetches
	retryAt  time.Time          // no new fetch for sessions before this
	fetched  time.Time          // when current was fetched
}

// held is one credential and the sessions using it.
type held struct {
	cred  *Credential
	lease Lease // as last renewed; guarded by entry.mu
	users map[*Handle]struct{}
	// final: retired for new sessions, and its sessions were told to move
	// to a fresh credential (OnRetire): it cannot be renewed further, was
	// refused or revoked, or its owner (Vault token) ends.
	final bool
	// capped: no renewal can extend it (max TTL reached, not renewable, or
	// Vault refused to renew it). A final lease that is not capped is still
	// renewed while sessions use it, so they have until its owner's end to
	// move.
	capped bool
	ended  bool          // revoked, expired or retired
	wake   chan struct{} // signalled when users come or go, or h is replaced
}

// signal wakes h's maintenance without blocking.
func (h *held) signal() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// Handle is one session's use of a credential.
type Handle struct {
	Name       string
	Credential *Credential

	release sync.Once
	store   *Store
	entry   *entry
	held    *held
	// guarded by entry.mu
	onEnd    func()
	onRetire func(deadline time.Time)
}

// Release ends this use. It is safe to call more than once.
func (h *Handle) Release() {
	h.release.Do(func() {
		e := h.entry
		e.mu.Lock()
		delete(h.held.users, h)
		h.onEnd, h.onRetire = nil, nil
		if len(h.held.users) == 0 {
			h.held.signal()
		}
		e.mu.Unlock()
	})
}

// OnEnd registers f, which must not block, to be called once when the
// credential can no longer be used: its lease is about to expire and cannot
// be renewed, so the session must end. A credential already ended calls f
// at once. Release unregisters it.
func (h *Handle) OnEnd(f func()) {
	e := h.entry
	e.mu.Lock()
	ended := h.held.ended
	if !ended {
		h.onEnd = f
	}
	e.mu.Unlock()
	if ended {
		f()
	}
}

// OnRetire registers f, which must not block, to be called once when new
// sessions no longer get this credential and sessions using it should move
// to a fresh one before deadline, when OnEnd ends them: its lease reached
// its max TTL, the upstream refused it, Vault no longer renews it, or the
// Vault token that created it ends. A credential already retired calls f
// at once. Release unregisters it.
func (h *Handle) OnRetire(f func(deadline time.Time)) {
	e := h.entry
	e.mu.Lock()
	final, deadline := h.held.final && !h.held.ended, endAt(h.held.lease)
	if !final {
		h.onRetire = f
	}
	e.mu.Unlock()
	if final {
		f(deadline)
	}
}

// Lease is the credential's lease as last renewed.
func (h *Handle) Lease() Lease {
	h.entry.mu.Lock()
	defer h.entry.mu.Unlock()
	return h.held.lease
}

// Invalidate reports that the upstream refused this credential (a lease
// revoked out of band, a rotated password): new sessions will not get it,
// and the sessions using it are told to move (OnRetire).
func (h *Handle) Invalidate() {
	if h.held.lease.Leased() {
		h.store.retire(h.entry, h.held, whyRefused, false)
		return
	}
	e := h.entry
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.current == h.held {
		e.current = nil
		h.store.log.Warn("credential refused upstream; fetching a new one for new sessions", zap.String("credential", e.name))
	}
}

// Acquire returns a credential for a new session. Errors are
// *UnavailableError, whose text may be shown to the client.
func (s *Store) Acquire(ctx context.Context, name string) (*Handle, error) {
	e, ok := s.entryMap()[name]
	if !ok {
		return nil, &UnavailableError{Name: name, Err: ErrUnknown}
	}
	// After a fetch this caller waited for, a credential that is valid but
	// already past its freshness is still served: fetching again would loop.
	fetched := false
	for {
		e.mu.Lock()
		now := time.Now()
		if h := e.current; h != nil && (s.fresh(h, now) || fetched && s.valid(h, now)) {
			if e.refresh > 0 && !h.cred.Lease.Leased() && now.Sub(e.fetched) >= e.refresh && e.inflight == nil {
				s.startFetch(e) // re-read in the background; serve the cached value now
			}
			return s.attach(e, h), nil
		}
		if wait := e.inflight; wait != nil {
			e.mu.Unlock()
			select {
			case <-wait:
				fetched = true
				continue
			case <-ctx.Done():
				e.mu.Lock()
				return s.validOr(e, name, ctx.Err())
			}
		}
		if fetched && e.lastErr == nil {
			e.mu.Unlock()
			return nil, &UnavailableError{Name: name, Err: errors.New("the source returned a credential that is already expired")}
		}
		if now.Before(e.retryAt) {
			// The source failed recently: serve what is still valid, or
			// fail at once rather than make every session wait.
			return s.validOr(e, name, e.lastErr)
		}
		wait := s.startFetch(e)
		e.mu.Unlock()
		select {
		case <-wait:
			fetched = true
		case <-ctx.Done():
			e.mu.Lock()
			return s.validOr(e, name, ctx.Err())
		}
	}
}

// validOr serves the cached credential while it is still valid (past its
// freshness, no matter), or fails with err. It is what a caller gets when
// the source failed recently, or when it can wait no longer for a fetch (a
// source that hangs rather than fails). Called with e.mu held; unlocks it.
func (s *Store) validOr(e *entry, name string, err error) (*Handle, error) {
	if h := e.current; h != nil && s.valid(h, time.Now()) {
		return s.attach(e, h), nil
	}
	e.mu.Unlock()
	return nil, &UnavailableError{Name: name, Err: err}
}

// attach adds a session to h and unlocks e.
func (s *Store) attach(e *entry, h *held) *Handle {
	hd := &Handle{Name: e.name, Credential: h.cred, store: s, entry: e, held: h}
	h.users[hd] = struct{}{}
	if len(h.users) == 1 {
		h.signal() // a stale lease in use again must be renewed
	}
	e.mu.Unlock()
	return hd
}

// fresh reports whether new sessions may be given h.
func (s *Store) fresh(h *held, now time.Time) bool {
	if h.ended || h.final {
		return false
	}
	l := h.lease
	if !l.Leased() {
		return true
	}
	if at, ok := ownerRetireAt(l); ok && !now.Before(at) {
		return false
	}
	life := lifetime(l)
	if now.Before(l.Issued.Add(life * 2 / 3)) {
		return true
	}
	// A renewable lease in use is due for renewal at two thirds of its
	// TTL; let new sessions share it while that renewal runs rather than
	// rotate a credential that is about to be extended.
	return len(h.users) > 0 && l.Renewable && life == l.TTL && now.Before(l.Issued.Add(life*5/6))
}

// valid reports whether h still works at all (for serving while the
// source is down): not ended and not within a safety margin of expiry.
func (s *Store) valid(h *held, now time.Time) bool {
	if h.ended {
		return false
	}
	l := h.lease
	if !l.Leased() {
		return true
	}
	return now.Before(endAt(l))
}

// hardEnd is when a lease stops working: its expiry, or its owner's end
// if that comes first.
func hardEnd(l Lease) time.Time {
	end := l.Expiry()
	if o := l.Owner.State(); !o.End.IsZero() && o.End.Before(end) {
		end = o.End
	}
	return end
}

// lifetime is how long a lease lasts from when it was issued or last
// renewed: its TTL, or less when its owner ends first.
func lifetime(l Lease) time.Duration {
	return max(min(l.TTL, hardEnd(l).Sub(l.Issued)), 0)
}

// endAt is when sessions on a lease are ended: a margin before its hard
// end, so they close cleanly before the database drops the role.
func endAt(l Lease) time.Time { return hardEnd(l).Add(-expiryMargin(lifetime(l))) }

// ownerLead is how long before its owner's end a lease is retired, so its
// sessions have time to move: a lease TTL, within [10s, 1h].
func ownerLead(ttl time.Duration) time.Duration { return min(max(ttl, 10*time.Second), time.Hour) }

// ownerRetireAt is when a lease must be retired because of its owner: at
// once when the owner was revoked; ownerLead before the owner's end once
// a newer owner has replaced it (before that, retiring would only fetch
// another lease under the same owner). ok is false when neither applies.
func ownerRetireAt(l Lease) (time.Time, bool) {
	o := l.Owner.State()
	switch {
	case o.Gone:
		return time.Time{}, true
	case o.Superseded && !o.End.IsZero():
		return o.End.Add(-ownerLead(l.TTL)), true
	}
	return time.Time{}, false
}

// expiryMargin is how long before expiry sessions are ended: long enough to
// close them cleanly, short against the TTL.
func expiryMargin(ttl time.Duration) time.Duration {
	return min(max(ttl/20, 500*time.Millisecond), 5*time.Second, ttl/4)
}

// startFetch starts a fetch in the background, owned by the Store; e.mu is
// held. It returns the channel closed when the fetch ends.
func (s *Store) startFetch(e *entry) chan struct{} {
	done := make(chan struct{})
	e.inflight = done
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(done)
		s.fetch(e)
	}()
	return done
}

// fetch reads a new credential, retrying with backoff within FetchTimeout,
// and installs it for new sessions.
func (s *Store) fetch(e *entry) {
	ctx, cancel := context.WithTimeout(s.ctx, s.opts.FetchTimeout)
	defer cancel()
	start := time.Now()
	var cred *Credential
	var err error
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		cred, err = e.src.Fetch(ctx)
		if err == nil || ctx.Err() != nil || !KindOf(err).Retryable() {
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if ctx.Err() != nil {
			break
		}
	}
	if err == nil && cred == nil {
		err = errors.New("source returned no credential")
	}
	if o := s.opts.Observer; o != nil {
		o.Fetched(e.name, time.Since(start), err)
	}

	e.mu.Lock()
	defer e.mu.Unlock()
	e.inflight = nil
	now := time.Now()
	if err != nil {
		e.lastErr = err
		e.failures++
		// 1s, 2s, 4s, capped at 10s: a recovered source is used again soon.
		e.retryAt = now.Add(min(time.Second<<min(e.failures-1, 4), 10*time.Second))
		if e.current != nil && !e.current.cred.Lease.Leased() {
			// A KV re-read failed: keep the last good value.
			e.fetched = now
		}
		s.log.Warn("credential fetch failed", zap.String("credential", e.name), zap.Int("failures", e.failures), zap.Error(err))
		if e.current == nil || !s.valid(e.current, now) {
			// Nothing valid to serve: retry on our own, so readiness (and a
			// pod that gets no sessions while unready) recovers with the
			// source rather than waiting for a session to ask.
			s.retryLater(e, e.retryAt)
		}
		return
	}
	e.lastErr, e.failures, e.retryAt = nil, 0, time.Time{}
	if cred.Lease.Leased() && cred.Lease.Issued.IsZero() {
		cred.Lease.Issued = now
	}
	h := &held{cred: cred, lease: cred.Lease, users: make(map[*Handle]struct{}), wake: make(chan struct{}, 1)}
	old := e.current
	e.current, e.fetched = h, now
	if old != nil && old.cred.Lease.Leased() {
		s.log.Info("credential rotated", zap.String("credential", e.name),
			zap.String("old_lease_sha256", old.lease.IDHash()), zap.String("lease_sha256", h.lease.IDHash()))
		if o := s.opts.Observer; o != nil {
			o.Rotated(e.name, nil)
		}
		old.signal()
	}
	if h.lease.Leased() {
		e.all[h] = struct{}{}
		s.observeLeases(e)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.maintain(e, h)
		}()
	}
}

// retryLater fetches again at t unless a credential became available, the
// entry was removed, or the Store closed. e.mu is held.
func (s *Store) retryLater(e *entry, t time.Time) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if !s.sleepUntil(t, nil, nil) || s.entryMap()[e.name] != e {
			return
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.lastErr != nil && e.inflight == nil && (e.current == nil || !s.valid(e.current, time.Now())) {
			s.startFetch(e)
		}
	}()
}

func (s *Store) observeLeases(e *entry) {
	if o := s.opts.Observer; o != nil {
		o.LeasesActive(e.name, len(e.all))
	}
}

// maintain runs a leased credential's life: renew it while sessions use
// it; once it is stale (unused past two thirds of its TTL) keep it only as a
// fallback until a replacement is fetched; retire it (its sessions move to
// a fresh credential) when it cannot be renewed further, Vault refuses to
// renew it, or its owner ends; revoke it once replaced and unused; and end
// its sessions just before it stops working for good.
func (s *Store) maintain(e *entry, h *held) {
	log := s.log.With(zap.String("credential", e.name), zap.String("lease_sha256", h.lease.IDHash()))
	increment := h.lease.TTL
	retry := 500 * time.Millisecond
	// triedLate: a renewal was attempted after endAt. A maintainer that
	// wakes late (a busy machine, renewals failing until endAt) still gives
	// a lease in use one renewal while it has not expired, rather than end
	// its sessions when the source could extend it.
	triedLate := false
	for {
		e.mu.Lock()
		l, final, capped, users := h.lease, h.final, h.capped, len(h.users)
		isCurrent := e.current == h
		e.mu.Unlock()
		now := time.Now()
		renewAt := l.Issued.Add(l.TTL * 2 / 3)
		end := endAt(l)
		pastEnd := !now.Before(end)
		// Past its owner's end no renewal helps: Vault revokes the lease.
		ownerBound := hardEnd(l).Before(l.Expiry())
		retireAt, byOwner := ownerRetireAt(l)

		switch {
		case users == 0 && !isCurrent:
			s.end(e, h, "unused", s.opts.RevokeUnused)
			return
		case pastEnd && (users == 0 || capped || triedLate || ownerBound || !now.Before(l.Expiry())):
			if users > 0 {
				log.Warn("credential lease ends; closing its sessions", zap.Int("sessions", users))
			}
			s.end(e, h, "expired", s.opts.RevokeUnused)
			return
		case users > 0 && !capped && !now.Before(renewAt):
			triedLate = pastEnd
			if !l.Renewable || e.leaser == nil {
				s.retire(e, h, "not renewable", true)
				continue
			}
			// A renewal answered after the lease expired is of no use.
			ctx, cancel := context.WithDeadline(s.ctx, minTime(now.Add(s.opts.FetchTimeout), l.Expiry()))
			nl, err := e.leaser.Renew(ctx, l, increment)
			cancel()
			if o := s.opts.Observer; o != nil {
				o.Renewed(e.name, err)
			}
			if err != nil && !KindOf(err).Retryable() {
				// Vault answered, and not with a renewal: the lease is gone
				// (revoked out of band) or no longer ours to renew.
				log.Warn("lease renewal refused; moving its sessions to a fresh credential", zap.Error(err))
				s.retire(e, h, "renewal refused", true)
				continue
			}
			if err != nil {
				log.Warn("lease renewal failed; will retry", zap.Error(err), zap.Duration("retry_in", retry))
				wakeAt := now.Add(retry)
				if wakeAt.After(end) {
					wakeAt = end
				}
				retry = min(2*retry, 10*time.Second)
				if !s.sleepUntil(wakeAt, nil, nil) {
					s.end(e, h, "shutdown", false)
					return
				}
				continue
			}
			retry, triedLate = 500*time.Millisecond, false
			nl.Owner = l.Owner // a renewal does not change who created the lease
			e.mu.Lock()
			h.lease = nl
			e.mu.Unlock()
			log.Debug("lease renewed", zap.Duration("ttl", nl.TTL))
			if nl.TTL < increment || !nl.Renewable {
				// Vault capped the renewal at the lease's max TTL: this is the
				// last extension. New sessions get a fresh credential now,
				// and the sessions on this one move to it.
				log.Info("lease reached its max TTL; rotating", zap.Duration("ttl_left", nl.TTL))
				s.retire(e, h, "max TTL", true)
			}
			continue
		case !final && byOwner && !now.Before(retireAt):
			why := "its Vault token ends"
			if l.Owner.State().Gone {
				why = "its Vault token was revoked"
			}
			s.retire(e, h, why, false)
			continue
		}
		next := end
		if users > 0 && !capped && renewAt.Before(next) {
			next = renewAt
		}
		if !final && byOwner && retireAt.Before(next) {
			next = retireAt
		}
		if !s.sleepUntil(next, h.wake, l.Owner.Changed()) {
			s.end(e, h, "shutdown", false) // Close revokes, if configured
			return
		}
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// whyRefused is the retirement reason of a credential the upstream refused.
const whyRefused = "refused upstream"

// retire takes h away from new sessions and tells its sessions to move to
// a fresh credential before its end (OnRetire); capped says no renewal can
// extend it any more. It stays current, as a
// fallback while the source is down, unless the upstream refused it.
func (s *Store) retire(e *entry, h *held, why string, capped bool) {
	e.mu.Lock()
	h.capped = h.capped || capped
	if h.final || h.ended {
		e.mu.Unlock()
		return
	}
	h.final = true
	if e.current == h && why == whyRefused {
		e.current = nil
	}
	deadline := endAt(h.lease)
	var notify []func(time.Time)
	for hd := range h.users {
		if f := hd.onRetire; f != nil {
			hd.onRetire = nil
			notify = append(notify, f)
		}
	}
	e.mu.Unlock()
	h.signal()
	s.log.Info("credential retired; its sessions move to a fresh one", zap.String("credential", e.name),
		zap.String("lease_sha256", h.lease.IDHash()), zap.String("reason", why),
		zap.Int("sessions", len(notify)), zap.Time("deadline", deadline))
	for _, f := range notify {
		f(deadline)
	}
}

// sleepUntil waits until t, a signal on wake or changed, or Close; false
// on Close.
func (s *Store) sleepUntil(t time.Time, wake, changed <-chan struct{}) bool {
	d := time.Until(t)
	if d < 0 {
		d = 0
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-wake:
		return true
	case <-changed:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// end retires h: new sessions no longer get it, its sessions are told to
// end, and its lease is revoked when revoke is set.
func (s *Store) end(e *entry, h *held, why string, revoke bool) {
	e.mu.Lock()
	if h.ended {
		e.mu.Unlock()
		return
	}
	h.ended = true
	var notify []func()
	for hd := range h.users {
		if f := hd.onEnd; f != nil {
			hd.onEnd = nil
			notify = append(notify, f)
		}
	}
	if e.current == h {
		e.current = nil
	}
	if why != "shutdown" && (!revoke || e.leaser == nil) {
		delete(e.all, h)
	}
	l := h.lease
	s.observeLeases(e)
	e.mu.Unlock()
	for _, f := range notify {
		f()
	}
	if !revoke || e.leaser == nil || why == "shutdown" {
		return
	}
	if !s.revoke(s.ctx, e, l, why) {
		return // left in e.all: Close tries again
	}
	e.mu.Lock()
	delete(e.all, h)
	s.observeLeases(e)
	e.mu.Unlock()
}

// revoke ends a lease at the source and logs the outcome; it reports
// whether the lease is gone.
func (s *Store) revoke(ctx context.Context, e *entry, l Lease, why string) bool {
	ctx, cancel := context.WithTimeout(ctx, s.opts.FetchTimeout)
	defer cancel()
	log := s.log.With(zap.String("credential", e.name), zap.String("lease_sha256", l.IDHash()), zap.String("reason", why))
	if err := e.leaser.Revoke(ctx, l); err != nil {
		log.Warn("lease revocation failed", zap.Error(err))
		return false
	}
	log.Info("lease revoked")
	return true
}

// Ready reports, per credential, whether a fetch has failed most recently;
// the map is empty when every source is serving.
func (s *Store) Ready() map[string]error {
	out := make(map[string]error)
	for name, e := range s.entryMap() {
		e.mu.Lock()
		if e.lastErr != nil && (e.current == nil || !s.valid(e.current, time.Now())) {
			out[name] = e.lastErr
		}
		e.mu.Unlock()
	}
	return out
}

// Warm fetches every credential once, concurrently, so the first sessions
// do not wait and readiness reflects the sources. It returns the failures
// by name.
func (s *Store) Warm(ctx context.Context) map[string]error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	out := make(map[string]error)
	for name := range s.entryMap() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h, err := s.Acquire(ctx, name)
			if err != nil {
				mu.Lock()
				out[name] = err
				mu.Unlock()
				return
			}
			h.Release()
		}()
	}
	wg.Wait()
	return out
}

// Close stops renewals and background fetches and, with RevokeOnClose,
// revokes every lease the Store still holds. Sessions should be closed
// first. It is safe to call once.
func (s *Store) Close(ctx context.Context) {
	s.cancel()
	s.wg.Wait()
	if !s.opts.RevokeOnClose {
		return
	}
	s.mu.Lock()
	all := append([]*entry(nil), s.retired...)
	s.mu.Unlock()
	for _, e := range s.entryMap() {
		all = append(all, e)
	}
	for _, e := range all {
		if e.leaser == nil {
			continue
		}
		e.mu.Lock()
		var leases []Lease
		for h := range e.all {
			leases = append(leases, h.lease)
		}
		e.all = make(map[*held]struct{})
		e.mu.Unlock()
		for _, l := range leases {
			s.revoke(ctx, e, l, "shutdown")
		}
	}
}
