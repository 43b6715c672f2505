package httpproxy

// What the proxy counts in the engine's metrics (proxy.Metrics). Label
// values are bounded: route hosts from the config and fixed values, never
// a host a client asked for.

const (
	// protocolName is the protocol label of every metric and audit record.
	protocolName = "http"
	// serviceName is the proxy's service: the engine's name for its
	// listener, and the service label of what concerns no route.
	serviceName = "http"
	// noRoute is the route label of a request that matched no route:
	// distinct from any host.
	noRoute = "none"
)

// request counts a request by route ("" for none), status and whether a
// credential was injected.
func (p *Proxy) request(route string, code int, injected bool) {
	if route == "" {
		route = noRoute
	}
	p.metrics.HTTPRequest(route, code, injected)
}

// refused counts a connection or request turned away, by the route, or
// by the listener for one that concerns no route ("").
func (p *Proxy) refused(route, reason string) {
	if route == "" {
		route = serviceName
	}
	p.metrics.Refused(protocolName, route, reason)
}

// timedOut counts a request ended by a timeout, by route as refused does.
func (p *Proxy) timedOut(route, kind string) {
	if route == "" {
		route = serviceName
	}
	p.metrics.TimedOut(protocolName, route, kind)
}
