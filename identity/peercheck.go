package identity

import (
	"errors"
	"fmt"
)

// Why a connection on a pod's socket was refused (the audit record's
// denied reason).
const (
	// ReasonUnattributed: credproxy could not tell who connected (the
	// peer's process is not visible, under peer_check: required).
	ReasonUnattributed = "unattributed"
	// ReasonPeerMismatch: the connecting process is not in the pod's
	// cgroup, or its PID no longer names it (exited, reused).
	ReasonPeerMismatch = "peer mismatch"
	// ReasonNotAllowed: no workloads rule allows the pod the service.
	ReasonNotAllowed = "workload not allowed"
)

// PeerError is a refused peer: Reason is one of the Reason constants.
type PeerError struct {
	Reason string
	Msg    string
}

func (e *PeerError) Error() string { return fmt.Sprintf("%s: %s", e.Reason, e.Msg) }

// ErrNoPeerPID says the kernel gave no PID for the peer: it runs in a PID
// namespace credproxy cannot see into (credproxy without hostPID).
var ErrNoPeerPID = errors.New("the peer's PID is not visible: credproxy does not share the host's PID namespace (hostPID)")

// PeerProcess is what a peer check learnt of the connecting process.
type PeerProcess struct {
	PID      int32
	UID, GID uint32
	PodUID   string // the pod whose cgroup the process is in; "" for none
	// Pidfd: the check held a pidfd for the process (SO_PEERPIDFD), so
	// a PID reused after the connection was made cannot pass.
	Pidfd bool
}

// PeerChecker checks that the process behind a unix socket connection is
// in a given pod's cgroup. ProcRoot is where procfs is mounted ("" for
// /proc).
type PeerChecker struct {
	ProcRoot string
	// noPeerPidfd makes the check take the fallback path (tests).
	noPeerPidfd bool
}
