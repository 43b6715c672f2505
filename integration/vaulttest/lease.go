package vaulttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path"
	"strings"
	"sync"
	"time"
)

// lease is a leased secret, as the expiration manager's leaseEntry.
type lease struct {
	id       string
	path     string // the request path that created it
	mount    *mount
	tokenID  string // the token that created it
	leaser   leaser
	internal map[string]any // the backend's InternalData; never changes

	// opMu serializes renewal and revocation of this lease, like Vault's
	// per-lease lock. It is taken before s.mu, never while holding it.
	opMu sync.Mutex

	// Guarded by Server.mu.
	issueTime   time.Time
	expireTime  time.Time
	lastRenewal time.Time
	renewable   bool
	inflight    bool      // the expiry loop is revoking it
	attempts    int       // failed revocations after expiry
	retryAt     time.Time // next revocation attempt after a failure
	revokeErr   string    // set once irrevocable
}

// registerLease is Vault's ExpirationManager.Register (and, for KV, the
// TTL reporting done instead): it assigns a lease ID under the request path
// and starts the expiry clock.
func (s *Server) registerLease(req *request, resp *response, sec *secretSpec) error {
	ttl, warnings, err := calculateTTL(s.view(req.mount), 0, sec.ttl, 0, sec.maxTTL, 0, time.Time{})
	if err != nil {
		return err
	}
	resp.warnings = append(resp.warnings, warnings...)
	if sec.noLease {
		resp.leaseDuration = int(seconds(ttl))
		resp.renewable = false
		return nil
	}
	now := time.Now()
	l := &lease{
		id:         path.Join(req.path, base62(24)),
		path:       req.path,
		mount:      req.mount,
		leaser:     sec.leaser,
		internal:   sec.internal,
		issueTime:  now,
		expireTime: now.Add(ttl),
		renewable:  sec.renewable,
	}
	if req.token != nil {
		l.tokenID = req.token.id
	}
	s.mu.Lock()
	s.leases[l.id] = l
	s.mu.Unlock()
	s.nudge()
	resp.leaseID = l.id
	resp.renewable = l.renewable
	// Vault rounds here: the clock has been ticking since the TTL was set.
	resp.leaseDuration = int(time.Until(l.expireTime).Round(time.Second) / time.Second)
	return nil
}

// renewLease is Vault's ExpirationManager.Renew.
func (s *Server) renewLease(ctx context.Context, id string, increment time.Duration) (*response, error) {
	s.mu.Lock()
	l := s.leases[id]
	s.mu.Unlock()
	if l == nil {
		return nil, badRequest("lease not found")
	}
	l.opMu.Lock()
	defer l.opMu.Unlock()

	s.mu.Lock()
	if s.leases[id] != l {
		s.mu.Unlock()
		return nil, badRequest("lease not found")
	}
	switch {
	case l.revokeErr != "":
		s.mu.Unlock()
		return nil, badRequest("lease is expired and has failed previous revocation attempts")
	case !time.Now().Before(l.expireTime) || l.inflight:
		s.mu.Unlock()
		return nil, badRequest("lease expired")
	case !l.renewable:
		s.mu.Unlock()
		return nil, badRequest("lease is not renewable")
	}
	m := l.mount
	s.mu.Unlock()

	ttl, maxTTL, err := l.leaser.renewSecret(ctx, l, increment)
	if err != nil {
		return nil, badRequest("failed to renew entry: resp: (*logical.Response)(nil) err: %s", err)
	}
	ttl, warnings, err := calculateTTL(s.view(m), increment, ttl, 0, maxTTL, 0, l.issueTime)
	if err != nil {
		return nil, badRequest("%s", err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	l.lastRenewal = now
	l.expireTime = now.Add(ttl)
	s.nudge()
	return &response{
		leaseID:       l.id,
		renewable:     l.renewable,
		leaseDuration: int(seconds(ttl)),
		warnings:      warnings,
	}, nil
}

// revokeLease is Vault's revokeCommon: the backend ends the secret, then
// the lease is forgotten. A missing lease is not an error.
func (s *Server) revokeLease(ctx context.Context, id string, force bool) error {
	s.mu.Lock()
	l := s.leases[id]
	s.mu.Unlock()
	if l == nil {
		return nil
	}
	l.opMu.Lock()
	defer l.opMu.Unlock()
	s.mu.Lock()
	current := s.leases[id] == l
	s.mu.Unlock()
	if !current {
		return nil
	}
	if err := l.leaser.revokeSecret(ctx, l); err != nil && !force {
		return fmt.Errorf("failed to revoke entry: resp: (*logical.Response)(nil) err: %w", err)
	}
	s.mu.Lock()
	delete(s.leases, id)
	s.mu.Unlock()
	return nil
}

// lazyRevokeLocked marks leases to expire now; the expiry loop revokes
// them (Vault's LazyRevoke). The caller holds s.mu.
func (s *Server) lazyRevokeLocked(l *lease) {
	if now := time.Now(); l.expireTime.After(now) {
		l.expireTime = now
	}
	l.attempts, l.retryAt = 0, time.Time{}
	s.nudge()
}

// leasesUnder returns the IDs of leases under a prefix: the lease itself
// when prefix is a lease ID, else those under prefix + "/", as Vault's
// revokePrefixCommon.
func (s *Server) leasesUnder(prefix string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !strings.HasSuffix(prefix, "/") {
		if s.leases[prefix] != nil {
			return []string{prefix}
		}
		prefix += "/"
	}
	var ids []string
	for id := range s.leases {
		if strings.HasPrefix(id, prefix) {
			ids = append(ids, id)
		}
	}
	return ids
}

// revokePrefix revokes the leases under prefix, synchronously or by
// marking them expired.
func (s *Server) revokePrefix(ctx context.Context, prefix string, sync, force bool) error {
	ids := s.leasesUnder(prefix)
	for i, id := range ids {
		if !sync {
			s.mu.Lock()
			if l := s.leases[id]; l != nil {
				s.lazyRevokeLocked(l)
			}
			s.mu.Unlock()
			continue
		}
		if err := s.revokeLease(ctx, id, force); err != nil {
			return fmt.Errorf("failed to revoke %q (%d / %d): %w", id, i+1, len(ids), err)
		}
	}
	return nil
}

// expireLoop revokes leases and tokens as they expire, like Vault's
// pending timers. It runs until Close; while the server is stopped it
// waits, so that nothing is revoked by a Vault that is down.
func (s *Server) expireLoop() {
	defer s.loopWG.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := s.expireDue()
		wait := time.Hour
		if !next.IsZero() {
			wait = max(time.Until(next), 0)
		}
		timer.Reset(wait)
		select {
		case <-s.quit:
			return
		case <-s.wake:
		case <-timer.C:
		}
	}
}

// expireDue revokes what is due and returns when to look again.
func (s *Server) expireDue() time.Time {
	s.mu.Lock()
	if s.paused {
		s.mu.Unlock()
		return time.Time{}
	}
	now := time.Now()
	next := s.expireTokensLocked(now)
	var due []*lease
	for _, l := range s.leases {
		if l.revokeErr != "" || l.inflight {
			continue
		}
		at := l.expireTime
		if l.retryAt.After(at) {
			at = l.retryAt
		}
		if at.After(now) {
			if next.IsZero() || at.Before(next) {
				next = at
			}
			continue
		}
		l.inflight = true
		due = append(due, l)
	}
	s.mu.Unlock()

	var wg sync.WaitGroup
	for _, l := range due {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.expireLease(l)
		}()
	}
	wg.Wait()
	if len(due) > 0 {
		return now // look again: more may have come due meanwhile
	}
	return next
}

// expireLease revokes an expired lease; on failure it schedules a retry
// with Vault's backoff, and gives up after maxRevokeAttempts.
func (s *Server) expireLease(l *lease) {
	ctx, cancel := s.backgroundContext(revokeTimeout)
	defer cancel()
	err := s.revokeLease(ctx, l.id, false)
	s.mu.Lock()
	defer s.mu.Unlock()
	l.inflight = false
	if err == nil || s.leases[l.id] != l {
		return
	}
	if s.baseCtx.Err() != nil {
		return // closing: not a revocation failure
	}
	l.attempts++
	s.logf("vaulttest: failed to revoke lease %s (attempt %d): %v", l.id, l.attempts, err)
	if l.attempts >= maxRevokeAttempts {
		l.revokeErr = fmt.Sprintf("out of retries: %v", err)
		return
	}
	// revokeExponentialBackoff: base·2^attempt, ±50%.
	exp := time.Duration(1<<l.attempts) * s.opts.RevokeRetryBase
	l.retryAt = time.Now().Add(exp/2 + time.Duration(rand.Int64N(int64(exp))))
}
