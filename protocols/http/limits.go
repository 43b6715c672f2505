package httpproxy

import (
	"fmt"
	"net"
	"net/http"
	"time"
)

// transportFor is the transport a request goes out on: its route's, or
// for a request passed through (no route, default: tunnel) the one whose
// dialer checks the deny list.
func (p *Proxy) transportFor(r *route) *http.Transport {
	if r == nil {
		return p.passTransport
	}
	return p.transport
}

// limitFailure is the refusal for an upstream exchange that failed on one
// of credproxy's own bounds, or nil.
func (x *exchange) limitFailure(err error) *http.Response {
	if de, ok := asDenied(err); ok {
		x.p.obs.Refused("", RefusedDestination)
		return x.refuse(http.StatusForbidden, "destination denied", deniedMessage(x, de), false)
	}
	return nil
}

func deniedMessage(x *exchange, de *DeniedError) string {
	return fmt.Sprintf("credproxy: no pass-through to %s: address %s %s", net.JoinHostPort(x.host, x.port), de.Addr, de.Why)
}

// refuseDestination answers a CONNECT whose destination is denied, on the
// hijacked connection.
func (p *Proxy) refuseDestination(x *exchange, client net.Conn, de *DeniedError) {
	msg := deniedMessage(x, de)
	x.status, x.reason, x.errMsg = http.StatusForbidden, "destination denied", msg
	p.obs.Refused("", RefusedDestination)
	_ = client.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	writeRawResponse(client, http.StatusForbidden, msg)
}
