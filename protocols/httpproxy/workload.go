package httpproxy

import (
	"errors"
	"net"
	"net/http"
	"strconv"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
)

// workloadAllows applies DaemonSet mode's rules to a request for route
// (nil: a host with no route). A pod no rule matches is refused
// everything; a pod with a rule is refused the routes it does not list,
// and unrouted hosts follow http.default. Nil outside DaemonSet mode.
func (p *Proxy) workloadAllows(r *route) *proxy.WorkloadError {
	if p.workload == nil {
		return nil
	}
	var err error
	switch {
	case r != nil:
		err = p.workload.Allowed(r.name())
	case p.workload.Rule == "":
		err = p.workload.Allowed("")
	}
	var we *proxy.WorkloadError
	if errors.As(err, &we) {
		return we
	}
	return nil
}

// refuseWorkload answers a connection that is not the pod's with 403,
// audits and closes it.
func (p *Proxy) refuseWorkload(conn net.Conn, sessionID string, err error) error {
	var we *proxy.WorkloadError
	reason := identity.ReasonUnattributed
	if errors.As(err, &we) {
		reason = we.Reason
	}
	body := "credproxy: " + err.Error() + "\n"
	msg := "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
	p.audit.Record(&audit.Record{Event: audit.EventDenied, SessionID: sessionID, Protocol: protocolName, Service: serviceName,
		Client: audit.Client{Addr: identity.ClientAddr(conn)}, Workload: p.auditWL, Reason: reason, Error: audit.String(err.Error()),
		Status: http.StatusForbidden})
	p.log.Warn("connection refused", zap.String("session_id", sessionID), zap.String("reason", reason), zap.Error(err))
	_, _ = conn.Write([]byte(msg))
	return conn.Close()
}
