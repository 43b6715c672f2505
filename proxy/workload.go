package proxy

import (
	"errors"
	"fmt"
	"net"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy/audit"
)

// WorkloadPolicy is what a protocol serving one pod's listener is told
// (Env.Workload): whom its connections belong to, and what the workloads
// rules let that pod use. A protocol calls Admit for each connection
// before it serves anything, and Allowed for each service or route it is
// about to use a credential for, and refuses with the *WorkloadError's
// reason and message. Nil outside DaemonSet mode: everything is allowed.
type WorkloadPolicy struct {
	// Workload goes into every audit record of the listener's sessions.
	Workload audit.Workload
	// Rule names the matching rule for messages ("workloads.rules[0]"),
	// "" when none matches.
	Rule string
	// allowed lists the services and route hosts the rule allows.
	allowed map[string]bool
	// check is the peer check of a unix socket connection; nil: none.
	check func(c *net.UnixConn) (identity.PeerProcess, error)
	// observe counts each decision (metrics by namespace and service
	// account); nil: not counted.
	observe func(result string)
}

// WorkloadError is a connection or request refused in DaemonSet mode.
// Reason is a fixed kind (identity.ReasonUnattributed,
// identity.ReasonPeerMismatch, identity.ReasonNotAllowed), for the audit
// record's reason and metrics; the message may be shown to the app.
type WorkloadError struct {
	Reason string
	Msg    string
}

func (e *WorkloadError) Error() string { return e.Msg }

// Admit checks a new connection: for a unix socket, that the process
// behind it is in the pod's cgroup (where the peer check is on).
func (p *WorkloadPolicy) Admit(c net.Conn) error {
	if p == nil {
		return nil
	}
	uc, ok := c.(*net.UnixConn)
	if !ok || p.check == nil {
		return nil
	}
	if _, err := p.check(uc); err != nil {
		var pe *identity.PeerError
		if !errors.As(err, &pe) {
			pe = &identity.PeerError{Reason: identity.ReasonUnattributed, Msg: err.Error()}
		}
		p.count(pe.Reason)
		return &WorkloadError{Reason: pe.Reason, Msg: fmt.Sprintf("%s: this socket belongs to pod %s/%s: %s",
			pe.Reason, p.Workload.Namespace, p.Workload.Pod, pe.Msg)}
	}
	return nil
}

// Allowed reports whether the pod may use service (a postgres service
// name or an http route host).
func (p *WorkloadPolicy) Allowed(service string) error {
	if p == nil {
		return nil
	}
	if p.Rule == "" {
		p.count(identity.ReasonNotAllowed)
		return &WorkloadError{Reason: identity.ReasonNotAllowed, Msg: fmt.Sprintf(
			"workload not allowed: no workloads rule matches namespace %q, service account %q (default deny)",
			p.Workload.Namespace, p.Workload.ServiceAccount)}
	}
	if !p.allowed[service] {
		p.count(identity.ReasonNotAllowed)
		return &WorkloadError{Reason: identity.ReasonNotAllowed, Msg: fmt.Sprintf(
			"workload not allowed: %s (namespace %q, service account %q) does not allow %s",
			p.Rule, p.Workload.Namespace, p.Workload.ServiceAccount, service)}
	}
	p.count("allowed")
	return nil
}

// AuditWorkload is the audit record's workload: nil outside DaemonSet mode.
func (p *WorkloadPolicy) AuditWorkload() *audit.Workload {
	if p == nil {
		return nil
	}
	w := p.Workload
	return &w
}

func (p *WorkloadPolicy) count(result string) {
	if p.observe != nil {
		p.observe(result)
	}
}
