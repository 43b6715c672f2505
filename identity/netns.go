package identity

import "errors"

// ErrNoPodProcess says no process of the pod runs yet: its sandbox has
// not started (the kubelet publishes volumes before it starts the pod).
var ErrNoPodProcess = errors.New("no process of the pod is running yet")

// ErrHostNetwork says the pod shares the host's network namespace
// (hostNetwork): a listener there would be every host-network process's.
var ErrHostNetwork = errors.New("the pod runs in the host's network namespace (hostNetwork)")

// Netns finds pods' network namespaces from their processes (which needs
// hostPID) and binds listeners inside them. ProcRoot is where procfs is
// mounted ("" for /proc).
type Netns struct {
	ProcRoot string
}
