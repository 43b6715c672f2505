package config

import (
	"fmt"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/net/publicsuffix"
)

// Checks of what a configuration does with a credential, as opposed to
// whether it is well formed. Each either refuses the configuration (an
// error: credproxy will not start with it) or warns (validate prints it,
// run logs it at start and on reload, and credproxy starts). The rule of
// thumb: refuse where the configuration hands a credential to parties the
// operator cannot have meant to trust, or where no correct configuration
// looks like this; warn where the risk is real but a deliberate setup can
// need it.

// checkHTTPListen refuses an HTTP listener that is not on loopback unless
// http.allow_non_loopback is set. Refused rather than warned: the proxy
// does not authenticate its clients, so a listener reachable from the
// network lends every route's credential to whoever can connect. That has
// to be a decision written in the config, not a log line that scrolls by.
// A host name other than localhost counts as non-loopback: validation does
// not resolve names.
func (v *validator) checkHTTPListen(h *HTTP) {
	if h.AllowNonLoopback || isLoopbackListen(h.Listen) {
		return
	}
	v.add("http.listen", "%q is not a loopback address: the proxy does not authenticate its clients, "+
		"so anyone who can reach it can send requests with the routes' credentials; "+
		"listen on 127.0.0.1, or set http.allow_non_loopback: true to accept that", h.Listen)
}

func isLoopbackListen(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// routeHost is a route's host, normalized as the proxy matches it:
// lower case, no trailing dot, an IP address in canonical form.
type routeHost struct {
	name     string // for a wildcard, the domain after "*."
	wildcard bool
	port     int // 0: the scheme's default port (443 or 80)
}

// splitRouteHost splits a host that checkRouteHost accepted.
func splitRouteHost(s string) routeHost {
	var r routeHost
	h := s
	if hh, p, err := net.SplitHostPort(s); err == nil {
		h = hh
		r.port, _ = strconv.Atoi(p)
	} else if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		h = s[1 : len(s)-1]
	}
	h, r.wildcard = strings.CutPrefix(h, "*.")
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if ip := net.ParseIP(h); ip != nil {
		h = ip.String()
	}
	r.name = h
	return r
}

func (r routeHost) loopback() bool {
	if ip := net.ParseIP(r.name); ip != nil {
		return ip.IsLoopback()
	}
	return r.name == "localhost" || strings.HasSuffix(r.name, ".localhost")
}

// metadataHosts are cloud instance-metadata endpoints outside the
// link-local ranges (which are refused whole).
var metadataHosts = map[string]bool{
	"fd00:ec2::254":            true, // AWS IMDS over IPv6
	"100.100.100.200":          true, // Alibaba Cloud
	"metadata.google.internal": true, // GCP, by name
}

// checkRouteDestination judges where a route sends its credential (s is the
// configured host, already known to be well formed).
func (v *validator) checkRouteDestination(path, s string) {
	r := splitRouteHost(s)
	ip := net.ParseIP(r.name)
	switch {
	case metadataHosts[r.name] || ip != nil && (ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast()):
		// Refused: a route there makes credproxy a way into the metadata
		// service (and the machine's own cloud credentials) for any app
		// that can reach the proxy, which default: deny otherwise stops.
		v.add(path, "%q is a cloud instance-metadata or link-local address: "+
			"a route there would open the metadata service, and this machine's own credentials, to the apps", s)
	case ip != nil && ip.IsUnspecified():
		// Refused: not a destination; connecting to it reaches this host.
		v.add(path, "%q is the unspecified address, not a destination", s)
	case r.loopback():
		// Warned: a local service is a legitimate target (a sidecar's
		// neighbour), but nothing ties the port to it.
		v.warn(path, "%q is this machine (loopback): the credential goes to whatever process listens on that port, "+
			"and any local user can bind a free port first", s)
	case ip != nil:
		// Warned: internal services are reached by address, and upstream
		// TLS still has to verify, but an address names no owner.
		v.warn(path, "%q is an IP address: the credential goes to whatever host holds that address; prefer a DNS name", s)
	default:
		v.checkPublicSuffix(path, s, r)
	}
}

// checkPublicSuffix refuses a wildcard over a public suffix (*.com,
// *.github.io, *.co.uk): it matches domains anyone can register, each of
// which would get the credential. An exact host that is an ICANN public
// suffix (co.uk, com) is only warned about: no one but the registry holds
// it, so it leaks nothing, but no API is served there either. An exact
// host that is a private suffix (github.io, s3.amazonaws.com) is the
// operator's own service and passes.
func (v *validator) checkPublicSuffix(path, s string, r routeHost) {
	suffix, icann := isPublicSuffix(r.name)
	switch {
	case r.wildcard && suffix:
		v.add(path, "%q: %s is a public suffix, so the wildcard matches domains anyone can register; "+
			"name a registered domain, e.g. *.example.com", s, r.name)
	case r.wildcard:
		// A wildcard rule in the list (*.kawasaki.jp) makes every name
		// directly under the domain a public suffix of its own.
		if under, _ := isPublicSuffix("credproxy-probe." + r.name); under {
			v.add(path, "%q: the names under %s are public suffixes, so the wildcard matches domains anyone can register", s, r.name)
		}
	case suffix && icann:
		v.warn(path, "%q is a public suffix (a top-level or registry domain), not a host an API is served from; did you mean a name under it?", s)
	}
}

// isPublicSuffix reports whether name is on the public suffix list, and
// whether in its ICANN section. publicsuffix.PublicSuffix answers every
// name: one that no rule lists gets its last label by the default rule
// "*", with icann false (internal, local). A listed suffix is either
// ICANN's or has a dot (private rules are all below a TLD).
func isPublicSuffix(name string) (suffix, icann bool) {
	ps, icann := publicsuffix.PublicSuffix(name)
	listed := icann || strings.Contains(ps, ".")
	return listed && ps == name, icann
}

// routeClaims detects two routes that match the same requests.
type routeClaims map[routeKey][]claimedRoute

type routeKey struct {
	name     string
	wildcard bool
}

type claimedRoute struct {
	index int
	host  string // as configured
	port  int
}

// claim refuses a route whose host and port another route already
// matches: one of the two credentials would be sent, silently. Host names
// match without regard to case or a trailing dot, and a route without a
// port matches the default ports, 443 (HTTPS and CONNECT) and 80 (plain
// HTTP), so api.example.com and api.example.com:443 collide.
func (rs routeClaims) claim(v *validator, path string, i int, host string) {
	r := splitRouteHost(host)
	k := routeKey{r.name, r.wildcard}
	for _, c := range rs[k] {
		switch {
		case c.port == r.port:
			v.add(path, "duplicate route for %q (also http.routes[%d])", host, c.index)
			return
		case c.port == 0 && (r.port == 443 || r.port == 80), r.port == 0 && (c.port == 443 || c.port == 80):
			v.add(path, "duplicate route for %q (also http.routes[%d], %q: a route without a port matches ports 443 and 80)",
				host, c.index, c.host)
			return
		}
	}
	rs[k] = append(rs[k], claimedRoute{index: i, host: host, port: r.port})
}

// checkCleartext warns when a route sends a credential itself over
// upstream: http. Warned, not refused: upstream: http is already the
// explicit opt-in to cleartext (INTERFACE.md), and a network that encrypts
// on its own (a service mesh, a VPN) is a deliberate reason to use it.
// aws_sigv4 sends a signature, not the key, and a loopback upstream never
// crosses a network; neither is warned about.
func (v *validator) checkCleartext(path string, r HTTPRoute) {
	if r.Upstream != "http" || (r.Host != "" && checkRouteHost(r.Host) == "" && splitRouteHost(r.Host).loopback()) {
		return
	}
	var what string
	switch {
	case r.Inject.Header != nil:
		what = "header " + r.Inject.Header.Name
	case r.Inject.Basic != nil:
		what = "basic auth credential"
	case r.Inject.Query != nil:
		what = "query parameter " + r.Inject.Query.Name
	default:
		return
	}
	v.warn(path, "the %s is sent upstream in cleartext: anyone on the network path can read and replay it; "+
		"use https unless the path is encrypted by other means", what)
}

// checkPrivateKey refuses a private key file that anyone but its owner may
// read. Refused rather than warned, as OpenSSH and PostgreSQL refuse loose
// key files: whoever reads the interception CA's key can intercept the
// HTTPS of every app that trusts the CA. Like PostgreSQL's ssl_key_file, a
// root-owned file may also be group-readable (0640): that is how
// Kubernetes mounts a Secret under fsGroup (root:fsGroup, mode 0440).
func (v *validator) checkPrivateKey(path, file string) {
	fi, err := os.Stat(file)
	if err != nil {
		return // readable reports it
	}
	uid, known := fileOwner(fi)
	if msg := keyPermProblem(fi.Mode().Perm(), uid, known); msg != "" {
		v.add(path, "%s %s", file, msg)
	}
}

func keyPermProblem(perm fs.FileMode, uid uint32, uidKnown bool) string {
	if perm&0o077 == 0 || (uidKnown && uid == 0 && perm&0o037 == 0) {
		return ""
	}
	return "is mode " + fmtMode(perm) + ": a private key must be readable by its owner only " +
		"(chmod 600; 640 is accepted for a root-owned file); whoever can read it can intercept every app that trusts the CA"
}

func fmtMode(m fs.FileMode) string { return fmt.Sprintf("%04o", uint32(m)) }
