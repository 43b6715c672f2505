//go:build !linux

package identity

import (
	"errors"
	"net"
)

// Check is only implemented on Linux.
func (pc *PeerChecker) Check(c *net.UnixConn, podUID string) (PeerProcess, error) {
	return PeerProcess{}, errors.New("peer checks need Linux")
}
