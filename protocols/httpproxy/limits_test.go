package httpproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// pipeWorld is a proxy and a cleartext upstream joined by net.Pipe, so
// that a test can run in a synctest bubble: time is virtual, and timeouts
// are tested by waiting them out in no real time.
type pipeWorld struct {
	p       *Proxy
	metrics *proxy.Metrics
	audit   *memAudit
	up      *http.Server
	upLn    *connListener
	store   *credentials.Store
	mu      sync.Mutex
	open    map[string]int // by route: "api" or "wild"
	maxOpen map[string]int
	wg      sync.WaitGroup
}

// newPipeWorld builds the proxy with cfg's limits; routes send api.test
// (and *.wild.test) to the upstream in cleartext. handler serves upstream.
func newPipeWorld(t *testing.T, dir string, tune func(*config.HTTP), handler http.HandlerFunc) *pipeWorld {
	t.Helper()
	if err := InitCA(dir, io.Discard); err != nil {
		t.Fatal(err)
	}
	w := &pipeWorld{metrics: proxy.NewMetrics(), audit: &memAudit{}, upLn: newConnListener(),
		open: map[string]int{}, maxOpen: map[string]int{}}
	w.up = &http.Server{Handler: handler, ErrorLog: zap.NewStdLog(zap.NewNop())}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		_ = w.up.Serve(w.upLn)
	}()
	st, err := credentials.NewStatic(map[string]string{"token": testToken})
	if err != nil {
		t.Fatal(err)
	}
	w.store = credentials.NewStore(map[string]credentials.Source{"tok": st}, credentials.Options{})
	api, wild := headerRoute("api.test"), headerRoute("*.wild.test")
	api.Upstream, wild.Upstream = "http", "http"
	cfg := config.HTTP{
		CA:     config.HTTPCA{CertFile: filepath.Join(dir, CACertFile), KeyFile: filepath.Join(dir, CAKeyFile)},
		Routes: []config.HTTPRoute{api, wild},
	}
	if tune != nil {
		tune(&cfg)
	}
	w.p, err = New(Options{Config: cfg, Credentials: w.store, Metrics: w.metrics, Audit: w.audit,
		DialContext: w.dial})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// checkCounted fails unless metric name has exactly one series, the
// protocol "http" one with labels, at 1.
func (w *pipeWorld) checkCounted(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	labels["protocol"] = "http"
	if v := metricValue(t, w.metrics, name, labels); v != 1 {
		t.Errorf("%s%v = %v, want 1", name, labels, v)
	}
	if n := seriesCount(t, w.metrics, name); n != 1 {
		t.Errorf("%s has %d series, want 1", name, n)
	}
}

func (w *pipeWorld) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	route := "api"
	if strings.Contains(addr, "wild") {
		route = "wild"
	}
	w.mu.Lock()
	w.open[route]++
	w.maxOpen[route] = max(w.maxOpen[route], w.open[route])
	w.mu.Unlock()
	c, s := net.Pipe()
	if err := w.upLn.hand(ctx, s); err != nil {
		return nil, err
	}
	return &trackedConn{Conn: c, w: w, route: route}, nil
}

// trackedConn counts the upstream connections open at once.
type trackedConn struct {
	net.Conn
	w     *pipeWorld
	route string
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.w.mu.Lock()
		c.w.open[c.route]--
		c.w.mu.Unlock()
	})
	return c.Conn.Close()
}

func (w *pipeWorld) maxOpenConns(route string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.maxOpen[route]
}

// conn opens an app connection to the proxy.
func (w *pipeWorld) conn() (net.Conn, *bufio.Reader) {
	c, s := net.Pipe()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		_ = w.p.ServeConn(context.Background(), s, "s")
	}()
	return c, bufio.NewReader(c)
}

func (w *pipeWorld) close() {
	w.p.Close()
	w.up.Close()
	w.upLn.Close()
	w.wg.Wait()
	w.store.Close(context.Background())
}

// request writes raw on c in the background (a pipe write blocks until
// read) and reads one response.
func roundTrip(t *testing.T, c net.Conn, br *bufio.Reader, raw string) (*http.Response, string) {
	t.Helper()
	go func() { _, _ = io.WriteString(c, raw) }()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// caDir is a directory for the interception CA, which newPipeWorld
// writes inside the bubble: its clock starts in 2000.
func caDir(t *testing.T) string { return t.TempDir() }

// A body that stops arriving ends the request after body_read_timeout with
// 408; a body that trickles in slower than that in total, but never stalls
// that long, goes through whole.
func TestBodyReadTimeout(t *testing.T) {
	dir := caDir(t)
	synctest.Test(t, func(t *testing.T) {
		var got sync.Map
		w := newPipeWorld(t, dir, func(c *config.HTTP) { c.BodyReadTimeout = config.Duration(15 * time.Second) },
			func(rw http.ResponseWriter, r *http.Request) {
				b, err := io.ReadAll(r.Body)
				got.Store(r.URL.Path, fmt.Sprintf("%d %v", len(b), err))
				_, _ = io.WriteString(rw, "ok")
			})
		defer w.close()

		// Stalled: 3 of 100 bytes, then nothing.
		c, br := w.conn()
		defer c.Close()
		go func() {
			_, _ = io.WriteString(c, "POST http://api.test/stalled HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\nabc")
		}()
		respc := make(chan *http.Response, 1)
		go func() {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Errorf("read response: %v", err)
			}
			respc <- resp
		}()
		time.Sleep(14 * time.Second)
		synctest.Wait()
		select {
		case <-respc:
			t.Fatal("the request ended before body_read_timeout")
		default:
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		var resp *http.Response
		select {
		case resp = <-respc:
		default:
			t.Fatal("a stalled body was not cut after body_read_timeout")
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(b), "http.body_read_timeout") {
			t.Errorf("stalled body: %d %q, want 408 naming http.body_read_timeout", resp.StatusCode, b)
		}
		w.checkCounted(t, "credproxy_timeouts_total", map[string]string{"service": "api.test", "kind": TimeoutBodyRead})

		// Flowing: one byte every 10s, 20 bytes over 200s.
		c2, br2 := w.conn()
		defer c2.Close()
		go func() {
			_, _ = io.WriteString(c2, "POST http://api.test/flowing HTTP/1.1\r\nHost: api.test\r\nContent-Length: 20\r\n\r\n")
			for range 20 {
				time.Sleep(10 * time.Second)
				if _, err := c2.Write([]byte{'x'}); err != nil {
					return
				}
			}
		}()
		resp2, err := http.ReadResponse(br2, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp2.Body.Close()
		if resp2.StatusCode != http.StatusOK {
			t.Errorf("flowing body: %d, want 200", resp2.StatusCode)
		}
		if v, _ := got.Load("/flowing"); v != "20 <nil>" {
			t.Errorf("upstream read %v of the flowing body", v)
		}
	})
}

// A streaming response and an idle wait for the next request are not cut
// by the body timeout once the body is in; idle_timeout closes a
// kept-alive connection that sends nothing more.
func TestIdleTimeoutAndStreamingResponse(t *testing.T) {
	dir := caDir(t)
	synctest.Test(t, func(t *testing.T) {
		w := newPipeWorld(t, dir, func(c *config.HTTP) {
			c.BodyReadTimeout = config.Duration(5 * time.Second)
			c.IdleTimeout = config.Duration(30 * time.Second)
		}, func(rw http.ResponseWriter, r *http.Request) {
			_, _ = io.ReadAll(r.Body)
			for i := range 10 { // a minute of server-sent events
				fmt.Fprintf(rw, "event %d\n", i)
				rw.(http.Flusher).Flush()
				time.Sleep(6 * time.Second)
			}
		})
		defer w.close()
		c, br := w.conn()
		defer c.Close()
		resp, body := roundTrip(t, c, br, "POST http://api.test/events HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\n\r\nhi")
		if resp.StatusCode != http.StatusOK || strings.Count(body, "event") != 10 {
			t.Fatalf("streaming response: %d %q", resp.StatusCode, body)
		}
		// Kept alive for idle_timeout, then closed.
		closed := make(chan error, 1)
		go func() {
			_, err := br.ReadByte()
			closed <- err
		}()
		time.Sleep(29 * time.Second)
		synctest.Wait()
		select {
		case err := <-closed:
			t.Fatalf("closed before idle_timeout: %v", err)
		default:
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		select {
		case <-closed:
		default:
			t.Fatal("an idle connection outlived idle_timeout")
		}
	})
}

// http.max_connections: one more connection is answered 503 at once and
// closed; a place freed is taken again.
func TestMaxConnections(t *testing.T) {
	dir := caDir(t)
	synctest.Test(t, func(t *testing.T) {
		w := newPipeWorld(t, dir, func(c *config.HTTP) { c.MaxConnections = 2 },
			func(rw http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(rw, "ok") })
		defer w.close()
		idle1, _ := w.conn()
		idle2, _ := w.conn()
		synctest.Wait()

		c, br := w.conn()
		resp, body := roundTrip(t, c, br, "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n")
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "http.max_connections 2") {
			t.Errorf("over the limit: %d %q, want 503 naming http.max_connections", resp.StatusCode, body)
		}
		if _, err := br.ReadByte(); err == nil {
			t.Error("the refused connection stayed open")
		}
		c.Close()
		w.checkCounted(t, "credproxy_connections_refused_total", map[string]string{"service": "http", "reason": RefusedMaxConnections})

		idle1.Close()
		synctest.Wait()
		c, br = w.conn()
		defer c.Close()
		if resp, body := roundTrip(t, c, br, "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n"); resp.StatusCode != http.StatusOK {
			t.Errorf("after a place was freed: %d %q", resp.StatusCode, body)
		}
		idle2.Close()
	})
}

// max_upstream_connections bounds a route's upstream connections, idle
// ones included: a request waits for a place up to the dial timeout, then
// gets 503; an idle connection gives its place up to a request for
// another host of the route.
func TestMaxUpstreamConnections(t *testing.T) {
	dir := caDir(t)
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		w := newPipeWorld(t, dir, func(c *config.HTTP) {
			for i := range c.Routes {
				c.Routes[i].MaxUpstreamConnections = 1
			}
		}, func(rw http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				<-release
			}
			_, _ = io.WriteString(rw, "ok")
		})
		defer w.close()

		slow, slowBR := w.conn()
		defer slow.Close()
		slowDone := make(chan int, 1)
		go func() {
			resp, _ := roundTrip(t, slow, slowBR, "GET http://api.test/slow HTTP/1.1\r\nHost: api.test\r\n\r\n")
			slowDone <- resp.StatusCode
		}()
		synctest.Wait() // the slow request holds the route's one connection

		c, br := w.conn()
		defer c.Close()
		resp, body := roundTrip(t, c, br, "GET http://api.test/fast HTTP/1.1\r\nHost: api.test\r\n\r\n")
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "max_upstream_connections (1)") {
			t.Errorf("over the route's bound: %d %q, want 503 naming max_upstream_connections", resp.StatusCode, body)
		}
		w.checkCounted(t, "credproxy_connections_refused_total", map[string]string{"service": "api.test", "reason": RefusedMaxUpstreamConnections})
		close(release)
		if code := <-slowDone; code != http.StatusOK {
			t.Errorf("slow request: %d", code)
		}
		if resp, _ := roundTrip(t, c, br, "GET http://api.test/again HTTP/1.1\r\nHost: api.test\r\n\r\n"); resp.StatusCode != http.StatusOK {
			t.Errorf("after the slow request: %d", resp.StatusCode)
		}

		// Wildcard route: a.wild.test's idle connection makes way for b's.
		for _, host := range []string{"a.wild.test", "b.wild.test"} {
			resp, body := roundTrip(t, c, br, "GET http://"+host+"/ HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s: %d %q", host, resp.StatusCode, body)
			}
		}
		for _, route := range []string{"api", "wild"} {
			if n := w.maxOpenConns(route); n != 1 {
				t.Errorf("route %s had %d upstream connections open at once, want 1", route, n)
			}
		}
	})
}
