package httpproxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
)

// helloServer listens on addr, says hello to each connection and counts
// them: a loopback service a pass-through must not reach.
type helloServer struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
}

func startHello(t *testing.T, addr string) *helloServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	h := &helloServer{ln: ln}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			h.accepted.Add(1)
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		h.wg.Wait()
	})
	return h
}

func (h *helloServer) port() string {
	_, p, _ := net.SplitHostPort(h.ln.Addr().String())
	return p
}

// Under default: tunnel, the real dialer refuses loopback, link-local and
// unspecified destinations, whether named by address or by a name that
// resolves to one, on CONNECT and on plain-HTTP pass-through alike.
func TestTunnelDenyDefaultList(t *testing.T) {
	target := startHello(t, "127.0.0.1:0")
	m := proxy.NewMetrics()
	tp := startProxy(t, proxySetup{def: "tunnel", realDial: true, metrics: m})
	port := target.port()

	connects := []string{
		"127.0.0.1:" + port,
		"127.1.2.3:" + port,
		"localhost:" + port, // resolves to 127.0.0.1 (and ::1)
		"[::1]:" + port,
		"0.0.0.0:" + port,
		"169.254.169.254:80",
		"[fe80::1]:80",
	}
	for _, target := range connects {
		t.Run("CONNECT "+target, func(t *testing.T) {
			c, _, status := tp.connect(t, target)
			defer c.Close()
			if status != http.StatusForbidden {
				t.Fatalf("CONNECT %s: status %d, want 403", target, status)
			}
		})
	}
	gets := []string{
		"http://127.0.0.1:" + port + "/",
		"http://localhost:" + port + "/",
		"http://169.254.169.254/latest/meta-data/",
	}
	client := tp.client(t)
	for _, u := range gets {
		t.Run("GET "+u, func(t *testing.T) {
			status, body := tp.get(t, client, u)
			if status != http.StatusForbidden || !strings.Contains(body, "http.tunnel_deny") {
				t.Fatalf("GET %s: %d %q, want 403 naming http.tunnel_deny", u, status, body)
			}
		})
	}
	// An absolute https URL on the proxy listener goes out over TLS
	// (not through a CONNECT): the same deny list.
	absHTTPS := []string{"https://127.0.0.1:" + port + "/", "https://localhost:" + port + "/"}
	for _, u := range absHTTPS {
		t.Run("absolute-form GET "+u, func(t *testing.T) {
			c, err := net.Dial("tcp", tp.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(ioTimeout))
			resp := tp.rawRequest(t, c, bufio.NewReader(c), "GET "+u+" HTTP/1.1\r\nHost: "+strings.TrimPrefix(strings.TrimSuffix(u, "/"), "https://")+"\r\n\r\n")
			if b := body(resp); resp.StatusCode != http.StatusForbidden || !strings.Contains(b, "http.tunnel_deny") {
				t.Fatalf("GET %s: %d %q, want 403 naming http.tunnel_deny", u, resp.StatusCode, b)
			}
		})
	}
	if n := target.accepted.Load(); n != 0 {
		t.Errorf("the loopback service accepted %d connections", n)
	}
	if !strings.Contains(tp.bodies.String(), "credproxy: no pass-through to localhost:"+port+": address 127.0.0.1:"+port+" is in http.tunnel_deny (127.0.0.0/8)") &&
		!strings.Contains(tp.bodies.String(), "is in http.tunnel_deny (::1/128)") {
		t.Errorf("no clear refusal for localhost in the bodies:\n%s", tp.bodies.String())
	}
	rec := tp.audit.find(t, "denied destination", func(r audit.Record) bool {
		return r.Event == audit.EventDenied && r.Reason == "destination denied" && r.Host == "localhost"
	})
	if rec.Status != http.StatusForbidden {
		t.Errorf("denied record status %d", rec.Status)
	}
	refused := map[string]string{"protocol": "http", "service": "http", "reason": RefusedDestination}
	if n := metricValue(t, m, "credproxy_connections_refused_total", refused); n != float64(len(connects)+len(gets)+len(absHTTPS)) {
		t.Errorf("credproxy_connections_refused_total%v = %v, want %d", refused, n, len(connects)+len(gets)+len(absHTTPS))
	}
	if n := seriesCount(t, m, "credproxy_connections_refused_total"); n != 1 {
		t.Errorf("credproxy_connections_refused_total has %d series, want 1", n)
	}
}

// http.tunnel_deny replaces the default list; credproxy's own listeners
// stay refused whatever it says.
func TestTunnelDenyConfigurableAndOwnListeners(t *testing.T) {
	target := startHello(t, "127.0.0.1:0")
	other := startHello(t, "127.0.0.1:0") // stands for the admin listener
	tp := startProxy(t, proxySetup{def: "tunnel", realDial: true,
		tune: func(c *config.HTTP) { c.TunnelDeny = []string{"169.254.0.0/16", "127.0.0.2"} },
		own:  func() []net.Addr { return []net.Addr{other.ln.Addr()} }})
	_, proxyPort, _ := net.SplitHostPort(tp.addr)

	// Loopback is allowed now: the tunnel reaches the service.
	c, br, status := tp.connect(t, "localhost:"+target.port())
	if status != http.StatusOK {
		t.Fatalf("CONNECT to an allowed loopback service: %d", status)
	}
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || body(resp) != "hello\n" {
		t.Fatalf("through the tunnel: %v %v", resp, err)
	}
	c.Close()

	for _, dest := range []string{
		"127.0.0.1:" + proxyPort,           // the proxy itself
		"localhost:" + proxyPort,           // by name
		"127.0.0.1:" + other.port(),        // another credproxy listener
		"127.0.0.2:" + target.port(),       // a single address in the list
		"169.254.169.254:" + target.port(), // still in the list
	} {
		c, _, status := tp.connect(t, dest)
		if status != http.StatusForbidden {
			t.Errorf("CONNECT %s: %d, want 403", dest, status)
		}
		c.Close()
	}
	if !strings.Contains(tp.bodies.String(), "is one of credproxy's own listeners") {
		t.Errorf("no own-listener refusal in the bodies:\n%s", tp.bodies.String())
	}
	if n := other.accepted.Load(); n != 0 {
		t.Errorf("the other listener accepted %d connections through the proxy", n)
	}
	if n := target.accepted.Load(); n != 1 {
		t.Errorf("the allowed service accepted %d connections, want 1", n)
	}
}

// A route that names a loopback host is not a pass-through: it is served,
// deny list or not.
func TestTunnelDenyLeavesRoutesAlone(t *testing.T) {
	up := startUpstream(t, nil)
	r := headerRoute("127.0.0.1:" + portOf(up.addr()))
	r.Upstream = "http"
	tp := startProxy(t, proxySetup{def: "tunnel", realDial: true, routes: []config.HTTPRoute{r}})
	status, b := tp.get(t, tp.client(t), "http://127.0.0.1:"+portOf(up.addr())+"/x")
	if status != http.StatusOK {
		t.Fatalf("routed loopback host: %d %q", status, b)
	}
}

// The check normalises what the dialer reports: IPv4-mapped and zoned
// addresses match the prefixes they belong to.
func TestDenyListCheck(t *testing.T) {
	d, err := newDenyList(append(config.DefaultTunnelDeny, "::ffff:10.0.0.0/104"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for addr, denied := range map[string]bool{
		"127.0.0.1:80":          true,
		"[::ffff:127.0.0.1]:80": true,
		"[fe80::1%eth0]:80":     true,
		"[::]:80":               true,
		"169.254.169.254:80":    true,
		"10.1.2.3:443":          true, // the mapped prefix, unmapped
		"93.184.215.14:443":     false,
		"[2606:4700::1]:443":    false,
		"example.com:443":       false, // a name is checked once resolved
	} {
		if got := d.checkAddress(addr) != nil; got != denied {
			t.Errorf("%s: denied %v, want %v", addr, got, denied)
		}
	}
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
