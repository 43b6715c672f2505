package credentials

import (
	"sync"
	"time"
)

// Owner is what a lease cannot outlive: the Vault token that created it.
// Vault revokes every lease a token created when the token expires or is
// revoked, so a lease's real end is the earlier of its own expiry and its
// owner's end. An owner's end is unknown until the token can no longer be
// renewed past it; a token revoked out of band is gone at once.
//
// The Vault client creates one Owner per token and marks it superseded
// once it holds a newer token: only then does it pay to move sessions off
// the old owner's leases early.
type Owner struct {
	mu         sync.Mutex
	end        time.Time // zero: unknown
	gone       bool      // revoked: its leases are gone already
	superseded bool      // a newer token has replaced this one
	changed    chan struct{}
}

// NewOwner returns an owner whose end is not known yet.
func NewOwner() *Owner { return &Owner{changed: make(chan struct{})} }

// OwnerState is a snapshot of an Owner.
type OwnerState struct {
	End        time.Time // zero while unknown
	Gone       bool
	Superseded bool
}

// State returns what is known of the owner; the zero state for nil.
func (o *Owner) State() OwnerState {
	if o == nil {
		return OwnerState{}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return OwnerState{End: o.end, Gone: o.gone, Superseded: o.superseded}
}

// Changed is closed the next time the owner's state changes.
func (o *Owner) Changed() <-chan struct{} {
	if o == nil {
		return nil
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.changed
}

// Ends records that the owner ends at t; an earlier end replaces a later
// one, a later one is ignored.
func (o *Owner) Ends(t time.Time) {
	o.update(func() bool {
		if !o.end.IsZero() && !t.Before(o.end) {
			return false
		}
		o.end = t
		return true
	})
}

// Gone records that the owner was revoked: its leases no longer exist.
func (o *Owner) Gone() {
	o.update(func() bool {
		if o.gone {
			return false
		}
		o.gone = true
		return true
	})
}

// Supersede records that a newer owner has taken this one's place.
func (o *Owner) Supersede() {
	o.update(func() bool {
		if o.superseded {
			return false
		}
		o.superseded = true
		return true
	})
}

func (o *Owner) update(f func() bool) {
	if o == nil {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if f() {
		close(o.changed)
		o.changed = make(chan struct{})
	}
}
