// Command benchhttp is the load generator and the upstream of
// scripts/bench-http.sh, which compares HTTPS requests made directly with
// the same requests through credproxy's interception proxy (bin/credproxy)
// and through Squid with ssl_bump.
//
//	benchhttp upstream -listen 127.0.0.1:PORT -hosts N -dir DIR
//
// serves HTTPS (HTTP/1.1, keep-alive, certificates from a throwaway
// ECDSA P-256 CA written to DIR/ca.pem) on PORT of 127.0.0.1 and of the
// next N-1 loopback addresses (127.0.0.2, …), each with a certificate of
// its own, until SIGTERM or SIGINT.
// Each response is -body bytes and says in X-Bench-Credential whether the
// request carried an Authorization header.
//
//	benchhttp load -url URL -new-host-url URL -via NAME=PROXY,CA[,PID] …
//
// drives one keep-alive load per -via (PROXY "-" for a direct run, CA the
// roots that client trusts, PID the process whose CPU time is charged to
// it), all with the same Go net/http client: for a proxy it sends CONNECT,
// then TLS inside the tunnel, as HTTPS_PROXY clients do. The loads take
// turns in short rounds so that whatever else the machine does weighs on
// all of them alike. Then it times the first request on a new connection,
// to a host seen before and to a new one, and prints one table.
//
// It measures and never judges: targets are printed beside the figures
// and the exit status is 0 whenever the runs worked.
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
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchhttp upstream|load [flags] (see the package doc)")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "upstream":
		err = upstream(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: upstream or load", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchhttp:", err)
		os.Exit(1)
	}
}

// ---- upstream ----

func upstream(args []string) error {
	fs := flag.NewFlagSet("benchhttp upstream", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address of the first host; the others use its port")
	hosts := fs.Int("hosts", 1, "loopback addresses to serve on: the -listen one and the next hosts-1")
	dir := fs.String("dir", ".", "directory for ca.pem, the CA the upstream's certificate is signed by")
	bodySize := fs.Int("body", 256, "response body bytes")
	_ = fs.Parse(args)

	ap, err := netip.ParseAddrPort(*listen)
	if err != nil || !ap.Addr().Is4() || !ap.Addr().IsLoopback() {
		return fmt.Errorf("-listen %q: want an IPv4 loopback address and port", *listen)
	}
	var addrs []netip.Addr
	for a := ap.Addr(); len(addrs) < max(1, *hosts); a = a.Next() {
		if !a.IsLoopback() {
			return fmt.Errorf("-hosts %d: runs past 127.255.255.255", *hosts)
		}
		addrs = append(addrs, a)
	}
	ca, err := newCA()
	if err != nil {
		return err
	}
	// Each address is a host of its own, with its own certificate.
	leaves := make(map[netip.Addr]*tls.Certificate, len(addrs))
	for i, a := range addrs {
		leaf, err := ca.leaf(a, int64(i)+2)
		if err != nil {
			return err
		}
		leaves[a] = &leaf
	}
	if err := os.WriteFile(filepath.Join(*dir, "ca.pem"), ca.pem, 0o644); err != nil {
		return err
	}

	payload := strings.Repeat("x", *bodySize)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cred := "0"
		if r.Header.Get("Authorization") != "" {
			cred = "1"
		}
		w.Header().Set("X-Bench-Credential", cred)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, payload)
	})
	srv := &http.Server{
		Handler:  handler,
		ErrorLog: log.New(io.Discard, "", 0),
		TLSConfig: &tls.Config{
			GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
				local, _ := netip.ParseAddrPort(hello.Conn.LocalAddr().String())
				if c, ok := leaves[local.Addr().Unmap()]; ok {
					return c, nil
				}
				return nil, fmt.Errorf("no certificate for %s", local)
			},
			NextProtos: []string{"http/1.1"},
		},
		// HTTP/1.1 only, as all three clients speak upstream.
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
	}
	var lns []net.Listener
	for _, a := range addrs {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(a, ap.Port()).String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return err
		}
		lns = append(lns, ln)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = srv.Serve(tls.NewListener(ln, srv.TLSConfig))
		}()
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	wg.Wait()
	return nil
}

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

// leaf is an ECDSA P-256 server certificate for one address, as a
// public HTTPS server would most likely have: the name in the subject and
// in the SANs.
func (c *ca) leaf(addr netip.Addr, serial int64) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: addr.String()},
		IPAddresses: []net.IP{addr.AsSlice()},
		NotBefore:   time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// ---- load ----

// via is one way to the upstream: direct, or through a proxy.
type via struct {
	name  string
	proxy *url.URL // nil: direct
	roots *x509.CertPool
	pid   int // 0: no process to charge CPU time to

	lat               []time.Duration
	elapsed           time.Duration
	cpu               time.Duration // the proxy process's CPU time while its load ran
	loadCPU, upCPU    time.Duration // the load generator's and the upstream's
	withCred, without int
}

type viaFlags []*via

func (v *viaFlags) String() string { return "" }

// Set parses NAME=PROXY,CA[,PID]; PROXY is "-" for direct.
func (v *viaFlags) Set(s string) error {
	name, rest, ok := strings.Cut(s, "=")
	parts := strings.Split(rest, ",")
	if !ok || name == "" || len(parts) < 2 || len(parts) > 3 {
		return fmt.Errorf("%q: want NAME=PROXY,CA[,PID]", s)
	}
	w := &via{name: name}
	if parts[0] != "-" {
		u, err := url.Parse(parts[0])
		if err != nil || u.Host == "" {
			return fmt.Errorf("%q: proxy %q is not a URL", s, parts[0])
		}
		w.proxy = u
	}
	pemBytes, err := os.ReadFile(parts[1])
	if err != nil {
		return err
	}
	w.roots = x509.NewCertPool()
	if !w.roots.AppendCertsFromPEM(pemBytes) {
		return fmt.Errorf("%s: no PEM certificate", parts[1])
	}
	if len(parts) == 3 {
		if w.pid, err = strconv.Atoi(parts[2]); err != nil || w.pid <= 0 {
			return fmt.Errorf("%q: PID %q", s, parts[2])
		}
	}
	*v = append(*v, w)
	return nil
}

// transport is a keep-alive client like any HTTPS_PROXY app's: CONNECT
// through the proxy (if any), then TLS to the upstream inside the tunnel.
func (w *via) transport(conns int) *http.Transport {
	tr := &http.Transport{
		MaxIdleConns: conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: time.Minute,
		DisableCompression: true,
		TLSClientConfig:    &tls.Config{RootCAs: w.roots},
	}
	if w.proxy != nil {
		tr.Proxy = http.ProxyURL(w.proxy)
	}
	return tr
}

// Targets of issue 12 for intercepted HTTPS through the binary.
const (
	targetRatio       = 0.6
	targetP50Overhead = 500 * time.Microsecond
)

func load(args []string) error {
	fs := flag.NewFlagSet("benchhttp load", flag.ExitOnError)
	target := fs.String("url", "", "URL every load requests")
	newHostURL := fs.String("new-host-url", "", "URL of the first-request timings, with %d for 2..new-hosts+1 (e.g. https://127.0.0.%d:PORT/first); empty: none")
	newHosts := fs.Int("new-hosts", 20, "first requests timed per way")
	duration := fs.Duration("duration", 10*time.Second, "measured time per way")
	warmup := fs.Duration("warmup", 2*time.Second, "unmeasured time per way before the measured rounds")
	rounds := fs.Int("rounds", 5, "rounds the measured time is split into; the ways take turns")
	concurrency := fs.Int("concurrency", 8, "concurrent keep-alive clients")
	upPID := fs.Int("upstream-pid", 0, "the upstream's process, to charge CPU time to (0: not counted)")
	note := fs.String("note", "", "a line printed under the heading (what else runs, versions)")
	var vias viaFlags
	fs.Var(&vias, "via", "NAME=PROXY,CA[,PID]: a way to the upstream (PROXY - for direct); repeat; the first is the baseline")
	_ = fs.Parse(args)
	if *target == "" || len(vias) == 0 {
		return errors.New("load needs -url and at least one -via")
	}
	*rounds = max(1, *rounds)

	fmt.Printf("HTTPS through the proxy binaries: %s measured per way in %d rounds taking turns, after %s warm-up; %d keep-alive clients; GOMAXPROCS=%d of %d CPUs\n",
		*duration, *rounds, *warmup, *concurrency, runtime.GOMAXPROCS(0), runtime.NumCPU())
	if *note != "" {
		fmt.Println(*note)
	}
	fmt.Println()

	clients := make([]*http.Client, len(vias))
	for i, w := range vias {
		tr := w.transport(*concurrency)
		defer tr.CloseIdleConnections()
		clients[i] = &http.Client{Transport: tr, Timeout: 30 * time.Second}
		if _, err := run(clients[i], *target, *concurrency, *warmup); err != nil {
			return fmt.Errorf("%s: warm-up: %w", w.name, err)
		}
	}
	slice := *duration / time.Duration(*rounds)
	for range *rounds {
		for i, w := range vias {
			cpu0, load0, up0 := procCPU(w.pid), procCPU(os.Getpid()), procCPU(*upPID)
			r, err := run(clients[i], *target, *concurrency, slice)
			if err != nil {
				return fmt.Errorf("%s: %w", w.name, err)
			}
			w.cpu += procCPU(w.pid) - cpu0
			w.loadCPU += procCPU(os.Getpid()) - load0
			w.upCPU += procCPU(*upPID) - up0
			w.lat = append(w.lat, r.lat...)
			w.withCred += r.withCred
			w.without += r.without
			w.elapsed += slice
		}
	}

	res := make([]summary, len(vias))
	for i, w := range vias {
		res[i] = summarize(w.lat, w.elapsed)
	}
	base := res[0]
	fmt.Printf("%-12s %10s %8s %10s %10s %12s %14s %12s\n", "way", "req/s", "ratio", "p50", "p99", "p50 overhead", "proxy CPU/req", "credential")
	for i, w := range vias {
		cpu := "-"
		if w.pid != 0 && len(w.lat) > 0 {
			cpu = fmtDur(w.cpu / time.Duration(len(w.lat)))
		}
		over := "-"
		if i > 0 {
			over = fmtDur(res[i].p50 - base.p50)
		}
		fmt.Printf("%-12s %10.0f %7.2fx %10s %10s %12s %14s %12s\n", w.name, res[i].rps, res[i].rps/base.rps,
			fmtDur(res[i].p50), fmtDur(res[i].p99), over, cpu, credential(w.withCred, w.without))
	}

	// Where the CPU went: when the machine's CPUs are the bound, a way's
	// req/s relative to direct can be at most direct's CPU per request
	// over its own, every process counted.
	if *upPID != 0 {
		fmt.Println()
		fmt.Println("CPU time per request, by process (the machine's whole CPU budget is shared by them and by whatever else runs)")
		fmt.Printf("%-12s %14s %10s %10s %10s %26s\n", "way", "load generator", "upstream", "proxy", "total", "CPU-bound ceiling vs direct")
		var baseTotal time.Duration
		for i, w := range vias {
			if len(w.lat) == 0 {
				continue
			}
			n := time.Duration(len(w.lat))
			total := (w.loadCPU + w.upCPU + w.cpu) / n
			proxyCPU, ceiling := "-", "-"
			if w.pid != 0 {
				proxyCPU = fmtDur(w.cpu / n)
			}
			if i == 0 {
				baseTotal = total
			} else if total > 0 {
				ceiling = fmt.Sprintf("%.2fx", float64(baseTotal)/float64(total))
			}
			fmt.Printf("%-12s %14s %10s %10s %10s %26s\n", w.name, fmtDur(w.loadCPU/n), fmtDur(w.upCPU/n), proxyCPU, fmtDur(total), ceiling)
		}
	}

	var first []summary
	if *newHostURL != "" {
		fmt.Println()
		fmt.Printf("first request on a new client connection (CONNECT, TLS, the request), %d each\n", *newHosts)
		fmt.Printf("%-12s %24s %24s\n", "way", "new host: p50 / max", "same host again: p50 / max")
		for _, w := range vias {
			fresh, err := firstRequests(w, *newHostURL, *newHosts)
			if err != nil {
				return fmt.Errorf("%s: first request to a new host: %w", w.name, err)
			}
			again, err := firstRequests(w, *newHostURL, *newHosts)
			if err != nil {
				return fmt.Errorf("%s: first request again: %w", w.name, err)
			}
			first = append(first, fresh)
			fmt.Printf("%-12s %24s %24s\n", w.name, fmtDur(fresh.p50)+" / "+fmtDur(fresh.max), fmtDur(again.p50)+" / "+fmtDur(again.max))
		}
	}

	// Targets, for the second way (credproxy) against the first (direct)
	// and the third (the peer).
	if len(vias) >= 2 {
		fmt.Println()
		fmt.Printf("%-44s %10s   %s\n", "target (issue 12)", "measured", "target")
		cp := res[1]
		ratio := cp.rps / base.rps
		fmt.Printf("%-44s %9.2fx   >= %.2fx  %s\n", vias[1].name+" / "+vias[0].name+" req/s", ratio, targetRatio, verdict(ratio >= targetRatio))
		over := cp.p50 - base.p50
		fmt.Printf("%-44s %10s   <= %s  %s\n", vias[1].name+" p50 overhead", fmtDur(over), fmtDur(targetP50Overhead), verdict(over <= targetP50Overhead))
		if len(vias) >= 3 {
			peer := res[2]
			fmt.Printf("%-44s %9.2fx   > 1.00x  %s\n", vias[1].name+" / "+vias[2].name+" req/s", cp.rps/peer.rps, verdict(cp.rps > peer.rps))
			fmt.Printf("%-44s %10s   < %s  %s\n", vias[1].name+" p50 vs "+vias[2].name+" p50", fmtDur(cp.p50), fmtDur(peer.p50), verdict(cp.p50 < peer.p50))
		}
		if len(first) >= 2 {
			fmt.Printf("%-44s %10s   <= 20ms   %s\n", vias[1].name+" first request to a new host (p50)", fmtDur(first[1].p50), verdict(first[1].p50 <= 20*time.Millisecond))
		}
	}
	return nil
}

func credential(with, without int) string {
	switch {
	case with == 0:
		return "none"
	case without == 0:
		return "every request"
	}
	return fmt.Sprintf("%d of %d", with, with+without)
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

type loadResult struct {
	lat               []time.Duration
	withCred, without int
}

// run has concurrency workers send GETs on client for d; every response
// must be a 200 with the full body.
func run(client *http.Client, u string, concurrency int, d time.Duration) (loadResult, error) {
	var (
		mu     sync.Mutex
		all    loadResult
		firstE error
		wg     sync.WaitGroup
	)
	deadline := time.Now().Add(d)
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine loadResult
			mine.lat = make([]time.Duration, 0, 4096)
			var err error
			for time.Now().Before(deadline) {
				t0 := time.Now()
				var resp *http.Response
				resp, err = client.Get(u)
				if err != nil {
					break
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %s", resp.Status)
				}
				if err != nil {
					break
				}
				mine.lat = append(mine.lat, time.Since(t0))
				if resp.Header.Get("X-Bench-Credential") == "1" {
					mine.withCred++
				} else {
					mine.without++
				}
			}
			mu.Lock()
			defer mu.Unlock()
			all.lat = append(all.lat, mine.lat...)
			all.withCred += mine.withCred
			all.without += mine.without
			if err != nil && firstE == nil {
				firstE = err
			}
		}()
	}
	wg.Wait()
	return all, firstE
}

// firstRequests times n requests, each on a new transport (a new TCP
// connection, CONNECT, a full TLS handshake), to the hosts of pattern.
func firstRequests(w *via, pattern string, n int) (summary, error) {
	var lat []time.Duration
	for i := range n {
		u := fmt.Sprintf(pattern, i+2)
		tr := w.transport(1)
		client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		t0 := time.Now()
		resp, err := client.Get(u)
		if err != nil {
			return summary{}, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		d := time.Since(t0)
		tr.CloseIdleConnections()
		if resp.StatusCode != http.StatusOK {
			return summary{}, fmt.Errorf("%s: status %s", u, resp.Status)
		}
		lat = append(lat, d)
	}
	return summarize(lat, 0), nil
}

type summary struct {
	rps           float64
	p50, p99, max time.Duration
}

func summarize(lat []time.Duration, over time.Duration) summary {
	if len(lat) == 0 {
		return summary{}
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration { return lat[min(len(lat)-1, int(f*float64(len(lat))))] }
	r := summary{p50: q(0.50), p99: q(0.99), max: lat[len(lat)-1]}
	if over > 0 {
		r.rps = float64(len(lat)) / over.Seconds()
	}
	return r
}

// procCPU is the user+system CPU time of process pid (0: none), from
// /proc/PID/stat, in clock ticks of 10ms.
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may contain spaces; fields count from after it.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
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
