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
