package identity

import "net"

// CheckWithoutPeerPidfd runs pc's check as on a kernel without
// SO_PEERPIDFD.
func CheckWithoutPeerPidfd(pc *PeerChecker, c *net.UnixConn, podUID string) (PeerProcess, error) {
	fallback := *pc
	fallback.noPeerPidfd = true
	return fallback.Check(c, podUID)
}
