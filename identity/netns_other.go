//go:build !linux

package identity

import (
	"errors"
	"net"
	"os"
)

var errNetnsLinux = errors.New("network namespaces need Linux")

// PodNetns is only implemented on Linux.
func (n *Netns) PodNetns(podUID string, current uint64, hint *int) (*os.File, uint64, error) {
	return nil, 0, errNetnsLinux
}

// Listen is only implemented on Linux.
func (n *Netns) Listen(ns *os.File, addr string) (net.Listener, error) { return nil, errNetnsLinux }

// Dial is only implemented on Linux.
func (n *Netns) Dial(ns *os.File, d *net.Dialer, network, addr string) (net.Conn, error) {
	return nil, errNetnsLinux
}
