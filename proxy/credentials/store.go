package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
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

// Store serves named credentials to sessions. New sessions share the
// credential a source last returned while it is fresh (unleased, or leased
// and not past two thirds of its TTL); concurrent requests on a cold cache
// cause a single Fetch. Every Acquire is paired with Handle.Release, so the
// Store knows which credentials are still in use.
type Store struct {
	now     func() time.Time
	entries map[string]*entry
}

// NewStore builds a Store over the named sources.
func NewStore(sources map[string]Source) *Store {
	s := &Store{now: time.Now, entries: make(map[string]*entry, len(sources))}
	for name, src := range sources {
		s.entries[name] = &entry{name: name, src: src}
	}
	return s
}

type entry struct {
	name string
	src  Source

	mu       sync.Mutex
	current  *held         // what new sessions get; nil until the first fetch
	inflight chan struct{} // closed when the running fetch ends
	lastErr  error         // the running fetch's result, for its waiters
}

// held is one credential and the sessions using it.
type held struct {
	cred  *Credential
	users int
}

// Handle is one session's use of a credential.
type Handle struct {
	Name       string
	Credential *Credential

	release sync.Once
	entry   *entry
	held    *held
}

// Release ends this use. It is safe to call more than once.
func (h *Handle) Release() {
	h.release.Do(func() {
		h.entry.mu.Lock()
		h.held.users--
		h.entry.mu.Unlock()
	})
}

// Acquire returns a credential for a new session. Errors are
// *UnavailableError, whose text may be shown to the client.
func (s *Store) Acquire(ctx context.Context, name string) (*Handle, error) {
	e, ok := s.entries[name]
	if !ok {
		return nil, &UnavailableError{Name: name, Err: ErrUnknown}
	}
	for {
		e.mu.Lock()
		if h := e.current; h != nil && s.fresh(h.cred) {
			h.users++
			e.mu.Unlock()
			return &Handle{Name: name, Credential: h.cred, entry: e, held: h}, nil
		}
		if wait := e.inflight; wait != nil {
			e.mu.Unlock()
			select {
			case <-wait:
			case <-ctx.Done():
				return nil, &UnavailableError{Name: name, Err: ctx.Err()}
			}
			e.mu.Lock()
			err := e.lastErr
			e.mu.Unlock()
			// A fetch that failed because its caller gave up says nothing
			// about the source: try again with our own context.
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
				return nil, &UnavailableError{Name: name, Err: err}
			}
			continue
		}
		done := make(chan struct{})
		e.inflight = done
		e.mu.Unlock()

		cred, err := e.src.Fetch(ctx)

		e.mu.Lock()
		e.inflight = nil
		e.lastErr = err
		if err == nil {
			if cred.Lease.Leased() && cred.Lease.Issued.IsZero() {
				cred.Lease.Issued = s.now()
			}
			e.current = &held{cred: cred}
		}
		close(done)
		e.mu.Unlock()
		if err != nil {
			return nil, &UnavailableError{Name: name, Err: err}
		}
	}
}

// fresh reports whether new sessions may still be given cred: always for an
// unleased credential, and until two thirds of the lease for a leased one, so
// a session never starts on a credential about to expire.
func (s *Store) fresh(cred *Credential) bool {
	if !cred.Lease.Leased() {
		return true
	}
	return s.now().Before(cred.Lease.Issued.Add(cred.Lease.TTL * 2 / 3))
}
