package httpproxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
)

// connCounter counts an upstream's connections: opened, and open now.
type connCounter struct {
	opened, open atomic.Int64
}

func (c *connCounter) state(_ net.Conn, st http.ConnState) {
	switch st {
	case http.StateNew:
		c.opened.Add(1)
		c.open.Add(1)
	case http.StateClosed, http.StateHijacked:
		c.open.Add(-1)
	}
}

// Routed GETs and HEADs share the upstream's keep-alive connections, across
// requests and across tunnels.
func TestLeanReusesUpstreamConnections(t *testing.T) {
	pki := newTestPKI(t)
	var (
		cc   connCounter
		reqs atomic.Int64
	)
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		reqs.Add(1)
		_, _ = io.WriteString(w, "ok")
	}))
	up.Config.ConnState = cc.state
	up.TLS = &tls.Config{Certificates: []tls.Certificate{pki.serverCert(t, "api.test")}}
	up.StartTLS()
	t.Cleanup(up.Close)
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": up.Listener.Addr().String()}})
	for i := range 3 {
		c := tp.client(t) // a new client: a new tunnel each time
		for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodGet} {
			req, _ := http.NewRequest(m, "https://api.test/x", nil)
			if status, _ := tp.do(t, c, req); status != http.StatusOK {
				t.Fatalf("tunnel %d %s: status %d", i, m, status)
			}
		}
		c.CloseIdleConnections()
	}
	if n := cc.opened.Load(); n != 1 {
		t.Errorf("upstream connections opened: %d, want 1", n)
	}
	if n := reqs.Load(); n != 9 {
		t.Errorf("upstream got %d requests, want 9", n)
	}
	tp.p.Close()
	waitFor(t, "idle upstream connections closed by Close", func() bool { return cc.open.Load() == 0 })
}

// waitFor polls cond for ioTimeout.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(ioTimeout); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting: %s", what)
}

// scriptedUpstream is a TLS upstream that answers each connection's
// requests with what answer returns for them (raw bytes), then closes the
// connection if it says so.
func scriptedUpstream(t *testing.T, pki *testPKI, answer func(conn, req int, r *http.Request) (raw string, hangUp bool)) (string, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	cert := pki.serverCert(t, "api.test")
	addr := startRawUpstream(t, func(c net.Conn) {
		n := int(conns.Add(1))
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		br := bufio.NewReader(tc)
		for i := 0; ; i++ {
			r, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			raw, hangUp := answer(n, i, r)
			if _, err := io.WriteString(tc, raw); err != nil || hangUp {
				return
			}
		}
	})
	return addr, &conns
}

func okResponse(body string) string {
	return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}

// A pooled connection the upstream closed while it was idle: the request
// goes out again on a new connection, and the app never notices.
func TestLeanRetriesOnAStalePooledConnection(t *testing.T) {
	pki := newTestPKI(t)
	// Every connection serves one request, says nothing of closing, and
	// closes: the next request on it finds it gone.
	addr, conns := scriptedUpstream(t, pki, func(_, _ int, _ *http.Request) (string, bool) { return okResponse("ok"), true })
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": addr}})
	c := tp.client(t)
	for i := range 4 {
		if status, b := tp.get(t, c, "https://api.test/x"); status != http.StatusOK || b != "ok" {
			t.Fatalf("request %d: %d %q", i, status, b)
		}
	}
	if n := conns.Load(); n < 4 {
		t.Errorf("upstream connections: %d, want one per request", n)
	}
}

// A connection is reused only after a response that was read to its end
// and followed by nothing: a body the app stopped reading, bytes the
// upstream sent unasked, and a response without framing each cost the
// connection.
func TestLeanDoesNotReuseUnfinishedConnections(t *testing.T) {
	pki := newTestPKI(t)
	addr, conns := scriptedUpstream(t, pki, func(_, _ int, r *http.Request) (string, bool) {
		switch r.URL.Path {
		case "/big":
			// The start of a long body, then nothing: it cannot end
			// before the app leaves (a whole 1 MiB body could, in the
			// socket buffers on loopback). The start is more than the
			// proxy's write buffers, so the headers reach the app.
			return "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + strings.Repeat("x", 64<<10), false
		case "/extra":
			return okResponse("ok") + "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", false
		case "/unframed":
			return "HTTP/1.1 200 OK\r\n\r\nto the end", true
		}
		return okResponse("ok"), false
	})
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": addr}})

	// The app reads a little of a long body and leaves.
	c := tp.client(t)
	resp, err := c.Get("https://api.test/big")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadFull(resp.Body, make([]byte, 10))
	resp.Body.Close()
	c.CloseIdleConnections()
	waitFor(t, "the interrupted request's audit record", func() bool {
		for _, r := range tp.audit.records() {
			if r.Path == "/big" {
				return true
			}
		}
		return false
	})

	c = tp.client(t)
	for _, path := range []string{"/extra", "/unframed", "/after"} {
		if status, b := tp.get(t, c, "https://api.test"+path); status != http.StatusOK || (path != "/unframed" && b != "ok") || (path == "/unframed" && b != "to the end") {
			t.Fatalf("%s: %d %q", path, status, b)
		}
	}
	if n := conns.Load(); n != 4 {
		t.Errorf("upstream connections: %d, want 4 (none of the first three reusable)", n)
	}
}

// Response headers past 1 MiB end the exchange with a 502.
func TestLeanResponseHeaderLimit(t *testing.T) {
	pki := newTestPKI(t)
	huge := strings.Repeat("X-Filler: "+strings.Repeat("y", 1000)+"\r\n", 1100)
	addr, _ := scriptedUpstream(t, pki, func(_, _ int, _ *http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\n" + huge + "Content-Length: 2\r\n\r\nok", true
	})
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": addr}})
	if status, b := tp.get(t, tp.client(t), "https://api.test/"); status != http.StatusBadGateway || !strings.Contains(b, "exceed 1 MiB") {
		t.Errorf("status %d body %q, want 502 naming the header limit", status, b)
	}
}

// An app that leaves while the upstream thinks ends the upstream request:
// its connection is closed.
func TestLeanAbortsWhenTheAppLeaves(t *testing.T) {
	pki := newTestPKI(t)
	up := startUpstream(t, pki, "api.test")
	var once sync.Once
	arrived, gone := make(chan struct{}), make(chan struct{})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(arrived) })
		select {
		case <-r.Context().Done():
			close(gone)
		case <-time.After(ioTimeout):
		}
	})
	tp := startProxy(t, proxySetup{upCA: pki, routes: []config.HTTPRoute{headerRoute("api.test")}, dial: map[string]string{"api.test": up.addr()}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://api.test/slow", nil)
	c := tp.client(t)
	done := make(chan error, 1)
	go func() {
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	<-arrived
	cancel() // the app closes its connection
	<-done
	select {
	case <-gone:
	case <-time.After(ioTimeout):
		t.Fatal("the upstream request went on after the app left")
	}
}
