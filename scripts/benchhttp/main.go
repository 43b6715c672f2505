// Command benchhttp measures credproxy's HTTP forward proxy against direct
// requests: requests/s and p50/p99 latency for plain HTTP and for
// intercepted HTTPS with header injection, the ratio, and how long the
// first request to a new host takes (CONNECT, certificate issuance, both
// TLS handshakes, the upstream request).
//
// Everything runs in this process on loopback: two upstream servers (HTTP
// and HTTPS with a certificate from a throwaway CA), the proxy
// (httpproxy.Proxy with a static credential, audit to a temp file), and a
// keep-alive load generator with -concurrency workers. Hostnames are never
// resolved: the proxy's dialer and the direct clients' dialer send them to
// the upstream servers. It measures and never judges; the targets are
// printed beside the figures. Run it with scripts/bench-http.sh.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/proxy"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

func main() {
	duration := flag.Duration("duration", 10*time.Second, "measured time per scenario")
	warmup := flag.Duration("warmup", 2*time.Second, "unmeasured time before each scenario")
	concurrency := flag.Int("concurrency", 8, "concurrent keep-alive clients")
	newHosts := flag.Int("new-hosts", 50, "first requests to new hosts to time")
	rounds := flag.Int("rounds", 5, "rounds the measured time is split into; scenarios take turns")
	auditFile := flag.Bool("audit", true, "write the audit log to a file (as deployed); false discards it")
	bodySize := flag.Int("body", 256, "response body bytes")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchhttp:", err)
			os.Exit(1)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "benchhttp:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(*duration, *warmup, *concurrency, *newHosts, *bodySize, max(1, *rounds), *auditFile); err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, "benchhttp:", err)
		os.Exit(1)
	}
}

func run(duration, warmup time.Duration, concurrency, newHosts, bodySize, rounds int, auditFile bool) error {
	dir, err := os.MkdirTemp("", "credproxy-benchhttp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// Upstreams.
	upCA, err := newCA()
	if err != nil {
		return err
	}
	upCAFile := filepath.Join(dir, "upstream-ca.pem")
	if err := os.WriteFile(upCAFile, upCA.pem, 0o600); err != nil {
		return err
	}
	leaf, err := upCA.leaf("bench.test", "*.new.bench.test")
	if err != nil {
		return err
	}
	payload := strings.Repeat("x", bodySize)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "" && r.Host != "direct" {
			// Direct requests carry no credential; proxied ones must.
			w.Header().Set("X-No-Auth", "1")
		}
		io.WriteString(w, payload)
	})
	plainLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	quiet := log.New(io.Discard, "", 0)
	plainSrv := &http.Server{Handler: handler, ErrorLog: quiet}
	var tlsConns atomic.Int64
	tlsSrv := &http.Server{Handler: handler, ErrorLog: quiet, TLSConfig: &tls.Config{Certificates: []tls.Certificate{leaf}},
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				tlsConns.Add(1)
			}
		}}
	var servers sync.WaitGroup
	servers.Add(2)
	go func() { defer servers.Done(); _ = plainSrv.Serve(plainLn) }()
	go func() { defer servers.Done(); _ = tlsSrv.Serve(tls.NewListener(tlsLn, tlsSrv.TLSConfig)) }()
	defer func() {
		plainSrv.Close()
		tlsSrv.Close()
		servers.Wait()
	}()
	plainAddr, tlsAddr := plainLn.Addr().String(), tlsLn.Addr().String()
	upstreamDial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		if strings.HasPrefix(addr, "plain.bench.test:") {
			return d.DialContext(ctx, network, plainAddr)
		}
		return d.DialContext(ctx, network, tlsAddr)
	}

	// The proxy.
	if err := httpproxy.InitCA(dir, io.Discard); err != nil {
		return err
	}
	static, err := credentials.NewStatic(map[string]string{"token": "bench-token-0123456789"})
	if err != nil {
		return err
	}
	store := credentials.NewStore(map[string]credentials.Source{"bench": static}, credentials.Options{})
	defer store.Close(context.Background())
	var sink audit.Sink = audit.Discard{}
	if auditFile {
		aw, err := audit.Open(filepath.Join(dir, "audit.jsonl"), nil)
		if err != nil {
			return err
		}
		defer aw.Close()
		sink = aw
	}
	inject := config.Inject{Header: &config.NameValue{Name: "Authorization", Value: "Bearer {{ .token }}"}}
	p, err := httpproxy.New(httpproxy.Options{
		Config: config.HTTP{
			CA:             config.HTTPCA{CertFile: filepath.Join(dir, httpproxy.CACertFile), KeyFile: filepath.Join(dir, httpproxy.CAKeyFile)},
			UpstreamCAFile: upCAFile,
			Default:        "deny",
			Routes: []config.HTTPRoute{
				{Host: "bench.test", Credentials: "bench", Upstream: "https", Inject: inject},
				{Host: "plain.bench.test", Credentials: "bench", Upstream: "http", Inject: inject},
				{Host: "*.new.bench.test", Credentials: "bench", Upstream: "https", Inject: inject},
			},
		},
		Credentials: store,
		Audit:       sink,
		Logger:      zap.NewNop(),
		DialContext: upstreamDial,
	})
	if err != nil {
		return err
	}
	proxyLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	serveCtx, stopServing := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- proxy.Serve(serveCtx, proxyLn, p, nil) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		proxyLn.Close()
		_ = p.Shutdown(ctx)
		stopServing()
		<-served
	}()
	proxyURL := &url.URL{Scheme: "http", Host: proxyLn.Addr().String()}
	interceptCA, err := os.ReadFile(filepath.Join(dir, httpproxy.CACertFile))
	if err != nil {
		return err
	}

	// Clients.
	directRoots := x509.NewCertPool()
	directRoots.AppendCertsFromPEM(upCA.pem)
	proxyRoots := x509.NewCertPool()
	proxyRoots.AppendCertsFromPEM(interceptCA)
	directDial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		if strings.HasSuffix(addr, ":80") {
			return d.DialContext(ctx, network, plainAddr)
		}
		return d.DialContext(ctx, network, tlsAddr)
	}
	transport := func(viaProxy bool, conns int) *http.Transport {
		tr := &http.Transport{MaxIdleConns: conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: time.Minute, DisableCompression: true}
		if viaProxy {
			tr.Proxy = http.ProxyURL(proxyURL)
			tr.TLSClientConfig = &tls.Config{RootCAs: proxyRoots}
		} else {
			tr.DialContext = directDial
			tr.TLSClientConfig = &tls.Config{RootCAs: directRoots}
		}
		return tr
	}

	fmt.Printf("credproxy HTTP proxy benchmark: %s measured per scenario after %s warm-up, %d keep-alive clients, %d-byte responses, GOMAXPROCS=%d (%d CPUs)\n",
		duration, warmup, concurrency, bodySize, runtime.GOMAXPROCS(0), runtime.NumCPU())
	auditTo := "audit to a file"
	if !auditFile {
		auditTo = "audit discarded"
	}
	fmt.Printf("load generator, proxy and upstreams share this process and its CPUs; header injection from a static credential; %s\n", auditTo)
	fmt.Println()

	// The scenarios take turns in short rounds, so that whatever else the
	// machine is doing weighs on direct and proxied runs alike.
	type scenario struct {
		name     string
		url      string
		viaProxy bool
		client   *http.Client
		tr       *http.Transport
		lat      []time.Duration
		elapsed  time.Duration
		cpu      time.Duration // process CPU time (user+system) while it ran
	}
	scenarios := []*scenario{
		{name: "plain HTTP, direct", url: "http://direct/x"},
		{name: "plain HTTP, via credproxy", url: "http://plain.bench.test/x", viaProxy: true},
		{name: "HTTPS, direct", url: "https://bench.test/x"},
		{name: "HTTPS, intercepted by credproxy", url: "https://bench.test/x", viaProxy: true},
	}
	for _, sc := range scenarios {
		sc.tr = transport(sc.viaProxy, concurrency)
		sc.client = &http.Client{Transport: sc.tr, Timeout: 30 * time.Second}
		defer sc.tr.CloseIdleConnections()
		if _, err := load(sc.client, sc.url, sc.viaProxy, concurrency, warmup); err != nil {
			return fmt.Errorf("%s: %w", sc.name, err)
		}
	}
	slice := duration / time.Duration(rounds)
	for range rounds {
		for _, sc := range scenarios {
			cpu0 := cpuTime()
			lat, err := load(sc.client, sc.url, sc.viaProxy, concurrency, slice)
			if err != nil {
				return fmt.Errorf("%s: %w", sc.name, err)
			}
			sc.cpu += cpuTime() - cpu0
			sc.lat = append(sc.lat, lat...)
			sc.elapsed += slice
		}
	}
	fmt.Printf("%-34s %12s %10s %10s %14s\n", "scenario", "requests/s", "p50", "p99", "CPU/request")
	res := make([]result, len(scenarios))
	cpuPer := make([]time.Duration, len(scenarios))
	for i, sc := range scenarios {
		res[i] = summarize(sc.lat, sc.elapsed)
		if len(sc.lat) > 0 {
			cpuPer[i] = sc.cpu / time.Duration(len(sc.lat))
		}
		fmt.Printf("%-34s %12.0f %10s %10s %14s\n", sc.name, res[i].rps, fmtDur(res[i].p50), fmtDur(res[i].p99), fmtDur(cpuPer[i]))
	}
	type pairResult struct{ direct, proxied result }
	results := []pairResult{{res[0], res[1]}, {res[2], res[3]}}
	fmt.Printf("(%d rounds of %s per scenario, taking turns; %d upstream TLS connections in all)\n", rounds, slice, tlsConns.Load())

	// First request to a new host: a new client connection, CONNECT, a
	// certificate minted for the host, TLS both sides, the request. Then
	// the same for a host whose certificate is cached, and direct.
	firstNew, err := firstRequests(newHosts, func(i int) (string, *http.Transport) {
		return fmt.Sprintf("https://h%d.new.bench.test/first", i), transport(true, 1)
	})
	if err != nil {
		return fmt.Errorf("first request to a new host: %w", err)
	}
	firstCached, err := firstRequests(newHosts, func(i int) (string, *http.Transport) {
		return fmt.Sprintf("https://h%d.new.bench.test/again", i), transport(true, 1)
	})
	if err != nil {
		return err
	}
	firstDirect, err := firstRequests(newHosts, func(i int) (string, *http.Transport) {
		return "https://bench.test/direct", transport(false, 1)
	})
	if err != nil {
		return err
	}

	fmt.Println()
	fmt.Printf("%-58s %10s %10s\n", "first request on a new connection (n="+fmt.Sprint(newHosts)+")", "p50", "max")
	fmt.Printf("%-58s %10s %10s\n", "new host via credproxy (certificate minted)", fmtDur(firstNew.p50), fmtDur(firstNew.max))
	fmt.Printf("%-58s %10s %10s\n", "same hosts again via credproxy (certificate cached)", fmtDur(firstCached.p50), fmtDur(firstCached.max))
	fmt.Printf("%-58s %10s %10s\n", "direct (one TLS handshake, no proxy)", fmtDur(firstDirect.p50), fmtDur(firstDirect.max))

	fmt.Println()
	fmt.Println("summary                                   measured      target")
	plain, sec := results[0], results[1]
	fmt.Printf("plain HTTP via credproxy / direct req/s   %6.2fx       -\n", plain.proxied.rps/plain.direct.rps)
	fmt.Printf("HTTPS intercepted / direct req/s          %6.2fx       >= 0.50x  %s\n", sec.proxied.rps/sec.direct.rps, verdict(sec.proxied.rps/sec.direct.rps >= 0.5))
	po := plain.proxied.p50 - plain.direct.p50
	so := sec.proxied.p50 - sec.direct.p50
	fmt.Printf("p50 overhead, plain HTTP (warm)           %8s     <= 1ms    %s\n", fmtDur(po), verdict(po <= time.Millisecond))
	fmt.Printf("p50 overhead, intercepted HTTPS (warm)    %8s     <= 1ms    %s\n", fmtDur(so), verdict(so <= time.Millisecond))
	fmt.Printf("first request to a new host (p50)         %8s     <= 20ms   %s\n", fmtDur(firstNew.p50), verdict(firstNew.p50 <= 20*time.Millisecond))
	fmt.Printf("first request to a new host (max)         %8s     -\n", fmtDur(firstNew.max))
	fmt.Printf("credproxy CPU per request, plain HTTP     %8s     -         (CPU/request via credproxy minus direct)\n", fmtDur(cpuPer[1]-cpuPer[0]))
	fmt.Printf("credproxy CPU per request, HTTPS          %8s     -\n", fmtDur(cpuPer[3]-cpuPer[2]))
	return nil
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

type result struct {
	rps      float64
	p50, p99 time.Duration
	max      time.Duration
}

// load runs concurrency workers doing GETs on client for d and returns
// every request's latency.
func load(client *http.Client, u string, viaProxy bool, concurrency int, d time.Duration) ([]time.Duration, error) {
	var (
		mu      sync.Mutex
		all     []time.Duration
		firstEr error
		wg      sync.WaitGroup
	)
	end := time.Now().Add(d)
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, 1<<14)
			for {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				resp, err := client.Get(u)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
					if err == nil && viaProxy && resp.Header.Get("X-No-Auth") != "" {
						err = errors.New("the upstream got no credential")
					}
				}
				if err != nil {
					mu.Lock()
					if firstEr == nil {
						firstEr = err
					}
					mu.Unlock()
					return
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			all = append(all, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return all, firstEr
}

func summarize(lat []time.Duration, over time.Duration) result {
	if len(lat) == 0 {
		return result{}
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration { return lat[min(len(lat)-1, int(f*float64(len(lat))))] }
	r := result{p50: q(0.50), p99: q(0.99), max: lat[len(lat)-1]}
	if over > 0 {
		r.rps = float64(len(lat)) / over.Seconds()
	}
	return r
}

// firstRequests times n requests, each on a fresh transport.
func firstRequests(n int, next func(i int) (string, *http.Transport)) (result, error) {
	var lat []time.Duration
	for i := range n {
		u, tr := next(i)
		client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		t0 := time.Now()
		resp, err := client.Get(u)
		if err != nil {
			return result{}, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		d := time.Since(t0)
		tr.CloseIdleConnections()
		if resp.StatusCode != http.StatusOK {
			return result{}, fmt.Errorf("%s: status %d", u, resp.StatusCode)
		}
		lat = append(lat, d)
	}
	return summarize(lat, 0), nil
}

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "-" + fmtDur(-d)
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d.Microseconds())
	default:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
}

// ---- a throwaway CA for the upstreams ----

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA() (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "benchhttp upstream CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &ca{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

func (c *ca) leaf(names ...string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
