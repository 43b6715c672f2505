package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/credproxy/credproxy/config"
)

// Passing through (http.default: tunnel) never reaches the host itself or
// its neighbourhood: a destination in http.tunnel_deny (loopback,
// link-local with the cloud metadata service, unspecified by default) or
// one of credproxy's own listeners is refused with 403. The check is made
// on the address actually dialed — in the dialer's Control hook, after DNS
// resolution and for every address tried — so a name that resolves (or is
// rebound) to 127.0.0.1 is refused too. Routed hosts are not checked: a
// route names its host on purpose.

// DeniedError is a pass-through destination refused by the deny list or
// because it is one of credproxy's own listeners.
type DeniedError struct {
	Addr netip.AddrPort
	Why  string // "is in http.tunnel_deny (127.0.0.0/8)", "is credproxy's own listener"
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("destination %s %s", e.Addr, e.Why)
}

// denyList checks pass-through destinations.
type denyList struct {
	prefixes []netip.Prefix
	// own lists credproxy's listening addresses, the proxy's own among
	// them (Options.OwnAddrs); nil lists none.
	own func() []net.Addr
	// localAddrs lists the host's interface addresses, for listeners
	// bound to an unspecified address.
	localAddrs func() ([]net.Addr, error)
}

func newDenyList(entries []string, own func() []net.Addr) (*denyList, error) {
	d := &denyList{own: own, localAddrs: net.InterfaceAddrs}
	for i, e := range entries {
		p, err := config.ParseDestination(e)
		if err != nil {
			return nil, fmt.Errorf("http.tunnel_deny[%d]: %w", i, err)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		d.prefixes = append(d.prefixes, p)
	}
	return d, nil
}

// check refuses ap if it is denied.
func (d *denyList) check(ap netip.AddrPort) error {
	a := ap.Addr().Unmap().WithZone("") // a zoned address matches no prefix
	ap = netip.AddrPortFrom(a, ap.Port())
	for _, p := range d.prefixes {
		if p.Contains(a) {
			return &DeniedError{Addr: ap, Why: fmt.Sprintf("is in http.tunnel_deny (%s)", p)}
		}
	}
	if d.own != nil && d.isOwn(ap) {
		return &DeniedError{Addr: ap, Why: "is one of credproxy's own listeners"}
	}
	return nil
}

func (d *denyList) isOwn(ap netip.AddrPort) bool {
	var anyIP bool
	for _, la := range d.own() {
		ta, ok := la.(*net.TCPAddr)
		if !ok || ta.Port != int(ap.Port()) {
			continue
		}
		ip, _ := netip.AddrFromSlice(ta.IP)
		ip = ip.Unmap()
		if ip == ap.Addr() {
			return true
		}
		if !ip.IsValid() || ip.IsUnspecified() {
			anyIP = true
		}
	}
	if !anyIP {
		return false
	}
	// A listener on every interface answers on each local address.
	if ap.Addr().IsLoopback() || ap.Addr().IsUnspecified() {
		return true
	}
	addrs, err := d.localAddrs()
	if err != nil {
		return true // cannot tell: refuse
	}
	for _, la := range addrs {
		if n, ok := la.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == ap.Addr() {
				return true
			}
		}
	}
	return false
}

// checkAddress checks a dialed "ip:port" (the Control hook's form); a host
// name is not an address yet and passes, to be checked once resolved.
func (d *denyList) checkAddress(address string) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil
	}
	return d.check(ap)
}

// control is the pass-through dialer's Control hook: it runs for every
// address the dialer tries, after resolution, before connecting.
func (d *denyList) control(_, address string, _ syscall.RawConn) error {
	return d.checkAddress(address)
}

// passDialer dials pass-through destinations. The real dialer checks each
// resolved address in its Control hook; a dialer injected by a test
// (Options.DialContext) is given only destinations whose literal address
// passes, since it may map names anywhere.
func (p *Proxy) passDialer(injected dialFunc) dialFunc {
	if injected == nil {
		d := &net.Dialer{KeepAlive: 30 * time.Second, Control: p.deny.control}
		injected = d.DialContext
	}
	dial := typedDial(injected)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if err := p.deny.checkAddress(addr); err != nil {
			return nil, &DialError{Addr: addr, Err: &net.OpError{Op: "dial", Net: network, Err: err}}
		}
		return dial(ctx, network, addr)
	}
}

// asDenied reports whether err is a refused pass-through destination.
func asDenied(err error) (*DeniedError, bool) {
	var de *DeniedError
	return de, errors.As(err, &de)
}
