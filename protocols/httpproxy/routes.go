package httpproxy

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// Default ports: a route without a port matches only the default port of
// the request's scheme.
const (
	portHTTP  = "80"
	portHTTPS = "443"
)

// errBadHost is wrapped by every authority parsing error.
var errBadHost = errors.New("invalid host")

// route is one configured http.routes entry, ready to match and inject.
type route struct {
	cfg      config.HTTPRoute
	host     string // normalized; for a wildcard, the domain after "*."
	wildcard bool
	port     string // "" = the scheme's default port
	inject   injector
	// sem bounds concurrent requests (max_concurrent); nil = unlimited.
	sem chan struct{}
	// With max_upstream_connections, the route has a transport of its own
	// and upstream holds a place per connection it has open; nil: the
	// proxy's shared transport, no bound of its own.
	transport *http.Transport
	upstream  chan struct{}
	// prepared is the injection of the credential last seen (prepare).
	prepared atomic.Pointer[prepared]
}

// prepared is a route's injection of one credential, worked out once for
// every request that uses that credential: for an injector that depends
// on the credential alone (fixedInjector), the rendered value (set), what
// it places (placed) and the response scrubber (echo). set is nil for an
// injector that works per request (aws_sigv4), or when the credential
// cannot be injected (Inject then reports why, per request).
type prepared struct {
	cred   *credentials.Credential
	set    func(*http.Request)
	placed []string
	echo   *echoScrubber // nil: nothing to scrub
}

// prepare returns the route's injection of cred, from the last request's
// if it used the same credential. A credential fetched anew (rotated,
// refreshed) is a new *Credential, so nothing outlives it but until the
// next request.
func (r *route) prepare(cred *credentials.Credential) *prepared {
	if pr := r.prepared.Load(); pr != nil && pr.cred == cred {
		return pr
	}
	pr := &prepared{cred: cred}
	if f, ok := r.inject.(fixedInjector); ok {
		fields := revealFields(cred)
		if set, err := f.fixed(fields); err == nil {
			scratch := &http.Request{Header: http.Header{}, URL: &url.URL{}}
			set(scratch)
			pr.set, pr.placed = set, f.Placed(scratch)
			pr.echo = newEchoScrubber(r.inject.Uses().pick(fields), pr.placed)
		}
		clear(fields)
	}
	r.prepared.Store(pr)
	return pr
}

// revealFields returns a credential's values, for injection and for
// redacting a message; callers clear the map when done.
func revealFields(c *credentials.Credential) map[string]string {
	fields := make(map[string]string, len(c.Fields))
	for name, s := range c.Fields {
		fields[name] = s.Reveal()
	}
	return fields
}

// name is the route as configured: the audit service and metric label.
func (r *route) name() string { return r.cfg.Host }

// acquire takes a max_concurrent slot without waiting.
func (r *route) acquire() bool {
	if r.sem == nil {
		return true
	}
	select {
	case r.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

func (r *route) release() {
	if r.sem != nil {
		<-r.sem
	}
}

// routeTable matches hosts to routes.
type routeTable struct {
	routes []*route
}

func newRouteTable(cfgs []config.HTTPRoute) (*routeTable, error) {
	t := &routeTable{}
	for i, rc := range cfgs {
		r, err := newRoute(i, rc)
		if err != nil {
			return nil, err
		}
		t.routes = append(t.routes, r)
	}
	return t, nil
}

// newRoute builds http.routes[i]; its error starts with that key path.
func newRoute(i int, rc config.HTTPRoute) (*route, error) {
	host, wildcard, port, err := parseRouteHost(rc.Host)
	if err != nil {
		return nil, fmt.Errorf("http.routes[%d].host: %w", i, err)
	}
	inj, err := newInjector(rc.Inject)
	if err != nil {
		return nil, fmt.Errorf("http.routes[%d].inject: %w", i, err)
	}
	r := &route{cfg: rc, host: host, wildcard: wildcard, port: port, inject: inj}
	if rc.MaxConcurrent > 0 {
		r.sem = make(chan struct{}, rc.MaxConcurrent)
	}
	return r, nil
}

// match returns the route for a normalized host and port, or nil. defPort
// is the default port of the request's scheme: a route without a port
// matches only that port. An exact host beats a wildcard, a route with an
// explicit port beats one without, and a longer wildcard domain beats a
// shorter one.
func (t *routeTable) match(host, port, defPort string) *route {
	var best *route
	bestScore := -1
	for _, r := range t.routes {
		want := r.port
		if want == "" {
			want = defPort
		}
		if port != want || !r.matchesHost(host) {
			continue
		}
		score := len(r.host)
		if !r.wildcard {
			score |= 1 << 22
		}
		if r.port != "" {
			score |= 1 << 21
		}
		if score > bestScore {
			best, bestScore = r, score
		}
	}
	return best
}

// routed reports whether any route names host, on any port. The
// certificate issuer asks it before signing anything.
func (t *routeTable) routed(host string) bool {
	for _, r := range t.routes {
		if r.matchesHost(host) {
			return true
		}
	}
	return false
}

// matchesHost: exact, or for *.domain any name strictly below domain
// (a.domain, a.b.domain; not domain itself, not domain.evil.com).
func (r *route) matchesHost(host string) bool {
	if !r.wildcard {
		return host == r.host
	}
	n := len(r.host)
	return len(host) > n+1 && host[len(host)-n-1] == '.' && host[len(host)-n:] == r.host
}

// parseRouteHost splits a configured route host ("api.example.com",
// "*.example.com:8443", "[::1]:443") into its normalized parts.
func parseRouteHost(s string) (host string, wildcard bool, port string, err error) {
	h := s
	if hh, p, err := net.SplitHostPort(s); err == nil {
		h = hh
		if port, err = normalizePort(p); err != nil {
			return "", false, "", err
		}
	} else if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		h = s[1 : len(s)-1]
	}
	if rest, ok := strings.CutPrefix(h, "*."); ok {
		wildcard, h = true, rest
	}
	if host, err = normalizeHost(h); err != nil {
		return "", false, "", err
	}
	if wildcard && net.ParseIP(host) != nil {
		return "", false, "", fmt.Errorf("%w: %q: a wildcard needs a domain", errBadHost, s)
	}
	return host, wildcard, port, nil
}

// splitAuthority parses a request authority (CONNECT target, Host header,
// URL host) into a normalized host and port; defPort applies when there is
// no port. Hosts are compared and dialed only in this form, so the host a
// route matched is the host the credential is sent to.
func splitAuthority(authority, defPort string) (host, port string, err error) {
	if authority == "" {
		return "", "", fmt.Errorf("%w: empty", errBadHost)
	}
	h, p := authority, ""
	switch {
	case strings.HasPrefix(authority, "["):
		end := strings.IndexByte(authority, ']')
		if end < 0 {
			return "", "", fmt.Errorf("%w: %q", errBadHost, authority)
		}
		h, p = authority[1:end], authority[end+1:]
		if p != "" {
			if p[0] != ':' {
				return "", "", fmt.Errorf("%w: %q", errBadHost, authority)
			}
			p = p[1:]
		}
		if ip := net.ParseIP(h); ip == nil || ip.To4() != nil {
			return "", "", fmt.Errorf("%w: %q", errBadHost, authority)
		}
	case strings.Count(authority, ":") > 1:
		// A bare IPv6 address, which cannot carry a port.
		if net.ParseIP(authority) == nil {
			return "", "", fmt.Errorf("%w: %q", errBadHost, authority)
		}
	default:
		if i := strings.IndexByte(authority, ':'); i >= 0 {
			h, p = authority[:i], authority[i+1:]
		}
	}
	if p == "" {
		p = defPort
	}
	if port, err = normalizePort(p); err != nil {
		return "", "", err
	}
	if host, err = normalizeHost(h); err != nil {
		return "", "", err
	}
	return host, port, nil
}

// normalizePort accepts 1-65535 in decimal, and drops leading zeros.
func normalizePort(p string) (string, error) {
	if p == "" || len(p) > 5 {
		return "", fmt.Errorf("%w: port %q", errBadHost, p)
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return "", fmt.Errorf("%w: port %q", errBadHost, p)
		}
	}
	n, _ := strconv.Atoi(p)
	if n < 1 || n > 65535 {
		return "", fmt.Errorf("%w: port %q", errBadHost, p)
	}
	return strconv.Itoa(n), nil
}

// normalizeHost lower-cases a DNS name and drops one trailing dot, or
// returns an IP address in its canonical form. Anything else (empty
// labels, bytes outside [a-z0-9-_.], non-ASCII) is an error: such a name
// matches no route and must not be dialed either.
func normalizeHost(h string) (string, error) {
	h = strings.TrimSuffix(h, ".")
	if h == "" {
		return "", fmt.Errorf("%w: empty", errBadHost)
	}
	if ip := net.ParseIP(h); ip != nil {
		return ip.String(), nil
	}
	if len(h) > 253 {
		return "", fmt.Errorf("%w: name too long", errBadHost)
	}
	b := []byte(h)
	label := 0
	for i, c := range b {
		switch {
		case 'A' <= c && c <= 'Z':
			b[i] = c + 'a' - 'A'
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		case c == '.':
			if label == 0 {
				return "", fmt.Errorf("%w: %q has an empty label", errBadHost, h)
			}
			label = 0
			continue
		default:
			return "", fmt.Errorf("%w: %q", errBadHost, h)
		}
		label++
		if label > 63 {
			return "", fmt.Errorf("%w: %q has a label over 63 bytes", errBadHost, h)
		}
	}
	if label == 0 {
		return "", fmt.Errorf("%w: %q has an empty label", errBadHost, h)
	}
	return string(b), nil
}

// authority joins host and port, leaving out the scheme's default port:
// the form sent as the Host header and signed by SigV4.
func authority(host, port, scheme string) string {
	if (scheme == "https" && port == portHTTPS) || (scheme == "http" && port == portHTTP) {
		if strings.IndexByte(host, ':') >= 0 {
			return "[" + host + "]"
		}
		return host
	}
	return net.JoinHostPort(host, port)
}
