package httpproxy

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy/config"
)

// oneSession is a client session cache that offers the last session it
// was given to every server, whatever its name: an app replaying a
// ticket in another tunnel.
type oneSession struct {
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (c *oneSession) Get(string) (*tls.ClientSessionState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cs, c.cs != nil
}

func (c *oneSession) Put(_ string, cs *tls.ClientSessionState) {
	if cs == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cs = cs
}

// tunnelGet opens a tunnel to target, does TLS with cfg (server name sni)
// and one GET inside; it returns the TLS connection's state and the
// response.
func tunnelGet(t *testing.T, tp *testProxy, target, sni string, cfg *tls.Config) (tls.ConnectionState, *http.Response) {
	t.Helper()
	tc, err := tp.tlsTunnel(t, target, sni, cfg)
	if err != nil {
		t.Fatalf("TLS in a tunnel to %s: %v", target, err)
	}
	defer tc.Close()
	host := strings.TrimSuffix(target, ":443")
	resp := tp.rawRequest(t, tc, bufio.NewReader(tc), "GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
	return tc.ConnectionState(), resp
}

func TestTunnelTLSSessionResumption(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test", "other.test")
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test"), headerRoute("other.test")},
		dial: map[string]string{"api.test": up.addr(), "other.test": up.addr()}})
	cache := &oneSession{}
	cfg := func() *tls.Config { return &tls.Config{RootCAs: tp.caPool, ClientSessionCache: cache} }

	// A TLS 1.3 ticket arrives after the handshake, with the first response.
	if cs, resp := tunnelGet(t, tp, "api.test:443", "api.test", cfg()); cs.DidResume || resp.StatusCode != http.StatusOK {
		t.Fatalf("first tunnel: resumed %v, status %d", cs.DidResume, resp.StatusCode)
	}
	t.Run("same host resumes", func(t *testing.T) {
		if cs, resp := tunnelGet(t, tp, "api.test:443", "api.test", cfg()); !cs.DidResume || resp.StatusCode != http.StatusOK {
			t.Errorf("second tunnel to api.test: resumed %v, status %d; want a resumed session and 200", cs.DidResume, resp.StatusCode)
		}
	})
	t.Run("another host's ticket does not", func(t *testing.T) {
		// api.test's ticket offered in a tunnel to other.test (the client
		// skips its own host name check, which would keep it from
		// offering it): a full handshake, with other.test's certificate.
		c := cfg()
		c.InsecureSkipVerify = true
		cs, resp := tunnelGet(t, tp, "other.test:443", "other.test", c)
		if cs.DidResume || resp.StatusCode != http.StatusOK {
			t.Fatalf("tunnel to other.test: resumed %v, status %d; want a full handshake and 200", cs.DidResume, resp.StatusCode)
		}
		if err := cs.PeerCertificates[0].VerifyHostname("other.test"); err != nil {
			t.Errorf("tunnel to other.test: %v", err)
		}
	})
	t.Run("SNI checked on resumption", func(t *testing.T) {
		if _, resp := tunnelGet(t, tp, "api.test:443", "api.test", cfg()); resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		// The client skips its own host name check to offer api.test's
		// session under another name; credproxy still sees the SNI.
		c := cfg()
		c.InsecureSkipVerify = true
		cs, resp := tunnelGet(t, tp, "api.test:443", "evil.test", c)
		if !cs.DidResume {
			t.Fatal("the session was not resumed: the test does not test what it should")
		}
		if b, _ := io.ReadAll(resp.Body); resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), `TLS server name "evil.test"`) {
			t.Errorf("resumed with SNI evil.test in a tunnel to api.test: %d %q, want 403", resp.StatusCode, b)
		}
	})
	if n := len(up.requests()); n != 4 {
		t.Errorf("upstream got %d requests, want 4", n)
	}
}
