package limit

// Defaults derived from the open-file limit. Every app connection may hold
// a second descriptor upstream (a Postgres session its server connection,
// an HTTP request or tunnel its upstream), so a listener's share is half
// of what is left once a reserve is kept back for everything else: the
// admin server and its scrapes, Vault, the audit log and the files
// credproxy reads, idle pooled upstream connections. Listeners split the
// rest evenly, so that all of them full still leave the admin server and
// /readyz working.

// reserve is what is kept back from nofile.
func reserve(nofile int) int { return 128 + nofile/8 }

// minShare keeps a tiny limit usable.
const minShare = 16

// Share is the number of app connections one of n listeners may hold by
// default under an open-file limit of nofile.
func Share(nofile, n int) int {
	if n < 1 {
		n = 1
	}
	return max((nofile-reserve(nofile))/2/n, minShare)
}

// PostgresDefaults splits a listener's share between established sessions
// and handshakes: one in eight for handshakes, which are bounded in time
// by startup_timeout and connect_timeout anyway.
func PostgresDefaults(share int) (sessions, handshakes int) {
	handshakes = max(share/8, 4)
	return max(share-handshakes, 1), handshakes
}

// fallback is the open-file limit assumed when it cannot be read: the
// common soft default.
const fallback = 1024

// Budget counts the app connections of the whole process against its
// open-file limit, whatever each listener's own limits say: with
// max_sessions or max_handshakes set higher than the descriptors allow,
// a connection over the budget is still refused (Postgres: FATAL 53300)
// rather than left unanswered when accept or the upstream dial runs out
// of descriptors, and the reserve stays free for the admin server. Each
// app connection counts once for the two descriptors it may hold.
type Budget struct {
	n   Counter
	max int
}

// NewBudget returns the budget for an open-file limit of nofile: the
// descriptors left after the reserve, two per connection.
func NewBudget(nofile int) *Budget {
	return &Budget{max: max((nofile-reserve(nofile))/2, minShare)}
}

// TryAcquire takes a place for one app connection, if one is left. A nil
// Budget has no ceiling.
func (b *Budget) TryAcquire() bool {
	if b == nil {
		return true
	}
	return b.n.TryAcquire(b.max)
}

// Release gives back a place taken by TryAcquire.
func (b *Budget) Release() {
	if b != nil {
		b.n.Release()
	}
}

// Max is how many app connections the budget allows.
func (b *Budget) Max() int {
	if b == nil {
		return 0
	}
	return b.max
}
