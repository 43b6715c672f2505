package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity"
	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
	"github.com/credproxy/credproxy/proxy/limit"
)

// DaemonSet mode (a workloads block): the engine serves no node-wide
// listener. An attribution source (the CSI node plugin, identity/csi)
// publishes each pod on the node with PublishWorkload and withdraws it
// with UnpublishWorkload; the engine then gives the pod listeners of its
// own — its postgres sockets in the directory published into it, the
// HTTP proxy on loopback in its network namespace — each with handlers
// the protocols built for that pod alone (Env.Workload), and a context
// of its own, so that withdrawing the pod ends its sessions.
//
// Credentials are the workload's own: one Vault login (with the pod's
// token) and one credential store per workload key — auth mount, role,
// namespace, service account name and UID. Pods of one service account
// on the node share them, as replicas sharing a sidecar's identity
// would; nothing is shared across keys. The last pod of a key to go
// closes its store, revoking its leases, and revokes its Vault token.

// How often a pod's network namespace is looked for until its sandbox
// runs, and re-checked after (a recreated sandbox has a new one).
const (
	netnsSearchInterval = 500 * time.Millisecond
	netnsCheckInterval  = 2 * time.Second
	// podDrainTimeout bounds the wait for a withdrawn pod's sessions
	// before its credentials are revoked.
	podDrainTimeout = 10 * time.Second
)

// tenantKey is a workload key: whom credproxy logs in to Vault as.
type tenantKey struct {
	mount, role               string
	namespace, serviceAccount string
	serviceAccountUID         string
}

// tenant is one workload key's credentials.
type tenant struct {
	key   tenantKey
	vault *credentials.VaultClient // nil: the rule reads no vault secret
	store *credentials.Store
	pods  map[string]*identity.Workload // by pod UID
	mu    sync.Mutex                    // guards pods for the token func
}

// token returns a live pod's token (the latest to expire): a withdrawn
// pod's token is never used again.
func (t *tenant) token() (identity.Token, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var best identity.Token
	var bestExp time.Time
	for _, w := range t.pods {
		tok, exp := w.Token().Get()
		if tok.IsZero() {
			continue
		}
		if best.IsZero() || exp.After(bestExp) {
			best, bestExp = tok, exp
		}
	}
	if best.IsZero() {
		return best, errors.New("no pod of this workload is published on the node")
	}
	return best, nil
}

// workloadPod is one published pod and its listeners.
type workloadPod struct {
	w      *identity.Workload
	dir    string
	tenant *tenant // nil without a rule
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	listeners []*listener
	svcs      []Service
	sessions  sync.WaitGroup
	watcher   sync.WaitGroup // the network namespace watcher
}

// podSet is the engine's published pods.
type podSet struct {
	s *Server
	// mu guards pods for readers without reloadMu (stopAccepting);
	// writers hold both.
	mu      sync.Mutex
	pods    map[string]*workloadPod // by pod UID
	tenants map[tenantKey]*tenant
	peer    *identity.PeerChecker
	netns   *identity.Netns
	// peerCheck: every connection on a pod's socket is checked against
	// the pod's cgroup.
	peerCheck bool
}

func newPodSet(s *Server, cfg *config.Config) (*podSet, error) {
	ps := &podSet{s: s, pods: map[string]*workloadPod{}, tenants: map[tenantKey]*tenant{},
		peer: &identity.PeerChecker{}, netns: &identity.Netns{}}
	switch cfg.Workloads.PeerCheck {
	case config.PeerCheckRequired:
		ps.peerCheck = true
	case config.PeerCheckAuto, "":
		ps.peerCheck = hostPID()
	}
	return ps, nil
}

// hostPID reports whether credproxy sees the host's processes: PID 1 is
// the host's init rather than a process in a pod's cgroup (credproxy's
// own container's, without hostPID).
func hostPID() bool {
	data, err := os.ReadFile("/proc/1/cgroup")
	if err != nil {
		return false
	}
	_, inPod := identity.CgroupPodUID(string(data))
	return !inPod
}

// PeerCheck reports whether connections on pods' sockets are checked
// against the pods' cgroups.
func (s *Server) PeerCheck() bool {
	return s.pods != nil && s.pods.peerCheck
}

// ErrNotWorkloads is returned by PublishWorkload when the config has no
// workloads block.
var ErrNotWorkloads = errors.New("the config has no workloads block")

// PublishWorkload gives pod w its own listeners: each postgres service on
// a socket in dir (which the attribution source exposes in the pod), and
// the HTTP proxy on http.listen inside the pod's network namespace as soon
// as its sandbox runs. Connections on them are the pod's. A pod already
// published (a republish) only gets w's token. A pod that no rule matches
// still gets its listeners: every connection is refused with the reason.
func (s *Server) PublishWorkload(w *identity.Workload, dir string) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	stopped := s.draining || !s.started
	s.mu.Unlock()
	if stopped {
		return errors.New("credproxy is not running")
	}
	ps := s.pods
	if ps == nil {
		return ErrNotWorkloads
	}
	if p, ok := ps.pods[w.PodUID]; ok {
		tok, exp := w.Token().Get()
		p.w.Token().Set(tok, exp)
		s.log.Debug("workload token refreshed", zap.Object("workload", w))
		return nil
	}
	p, err := ps.publish(s.cfg, w, dir)
	if err != nil {
		return err
	}
	ps.mu.Lock()
	ps.pods[w.PodUID] = p
	ps.mu.Unlock()
	s.log.Info("workload published", zap.Object("workload", w), zap.String("dir", dir),
		zap.Bool("rule", p.tenant != nil), zap.Bool("peer_check", ps.peerCheck))
	return nil
}

// UnpublishWorkload withdraws pod podUID: its listeners close, its
// sessions end at once, and when it was the last pod of its workload key
// the key's leases and Vault token are revoked. It reports whether the pod
// was published.
func (s *Server) UnpublishWorkload(podUID string) bool {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	ps := s.pods
	if ps == nil {
		return false
	}
	p, ok := ps.pods[podUID]
	if !ok {
		return false
	}
	ps.mu.Lock()
	delete(ps.pods, podUID)
	ps.mu.Unlock()
	ps.withdraw(p)
	s.log.Info("workload withdrawn", zap.Object("workload", p.w))
	return true
}

// Workloads lists the published pods' UIDs.
func (s *Server) Workloads() []string {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if s.pods == nil {
		return nil
	}
	out := make([]string, 0, len(s.pods.pods))
	for uid := range s.pods.pods {
		out = append(out, uid)
	}
	slices.Sort(out)
	return out
}

// publish builds and binds pod w's listeners under cfg. reloadMu is held.
func (ps *podSet) publish(cfg *config.Config, w *identity.Workload, dir string) (*workloadPod, error) {
	s := ps.s
	wl := cfg.Workloads
	p := &workloadPod{w: w, dir: dir}
	p.ctx, p.cancel = context.WithCancel(s.sessCtx)
	ruleIdx := -1
	for i := range wl.Rules {
		if m := wl.Rules[i].Match; m.Namespace == w.Namespace && m.ServiceAccount == w.ServiceAccount {
			ruleIdx = i
		}
	}
	var policyBase WorkloadPolicy
	var creds Credentials = noCredentials{}
	labels := [2]string{"", ""} // metrics: the rule's names; "" for pods no rule matches
	if ruleIdx >= 0 {
		rule := wl.Rules[ruleIdx]
		t, err := ps.tenantFor(cfg, rule, w)
		if err != nil {
			p.cancel()
			return nil, err
		}
		p.tenant = t
		creds = t.store
		policyBase.Rule = fmt.Sprintf("workloads.rules[%d]", ruleIdx)
		policyBase.allowed = map[string]bool{}
		for _, a := range rule.Allow {
			policyBase.allowed[a] = true
		}
		labels = [2]string{w.Namespace, w.ServiceAccount}
	}
	policyBase.Workload = audit.Workload{Namespace: w.Namespace, ServiceAccount: w.ServiceAccount,
		Pod: w.Pod, PodUID: w.PodUID, Node: w.Node}
	policyBase.observe = func(result string) { s.metrics.workloadConnection(labels[0], labels[1], result) }
	s.metrics.workloadPublished(labels[0], labels[1], 1)

	// The pod's sockets.
	unixPolicy := policyBase
	unixPolicy.Workload.Attribution = identity.AttributionCSI
	if ps.peerCheck {
		unixPolicy.Workload.Attribution = identity.AttributionCSIPeer
		uid := w.PodUID
		unixPolicy.check = func(c *net.UnixConn) (identity.PeerProcess, error) { return ps.peer.Check(c, uid) }
	}
	pgCfg := *cfg
	pgCfg.HTTP = nil
	pgCfg.Postgres = slices.Clone(cfg.Postgres)
	for i := range pgCfg.Postgres {
		pgCfg.Postgres[i].Listen = "unix:" + filepath.Join(dir, config.WorkloadSocket(cfg.Postgres[i].Listen))
	}
	svcs, err := ps.build(&pgCfg, creds, &unixPolicy, w)
	if err != nil {
		ps.fail(p)
		return nil, err
	}
	for _, sv := range svcs {
		ln, err := Listen(sv.Listen, sv.SocketMode)
		if err != nil {
			for _, sv := range svcs {
				sv.release()
			}
			ps.fail(p)
			return nil, fmt.Errorf("%s: %w", sv.Name, err)
		}
		p.add(s, sv, ln)
	}

	// The HTTP proxy in the pod's network namespace.
	if cfg.HTTP != nil && wl.HTTPNetns() {
		netPolicy := policyBase
		netPolicy.Workload.Attribution = identity.AttributionNetns
		httpCfg := *cfg
		httpCfg.Postgres = nil
		p.watcher.Add(1)
		go func() {
			defer p.watcher.Done()
			ps.watchNetns(p, &httpCfg, creds, &netPolicy)
		}()
	}
	return p, nil
}

// build has every protocol build cfg's services for one pod.
func (ps *podSet) build(cfg *config.Config, creds Credentials, policy *WorkloadPolicy, w *identity.Workload) ([]Service, error) {
	s := ps.s
	env := Env{
		Credentials: creds,
		Audit:       s.audit,
		Logger:      s.log.With(zap.String("namespace", w.Namespace), zap.String("pod", w.Pod)),
		Metrics:     s.metrics,
		Limits:      func(string, string) *limit.Listener { return &limit.Listener{} },
		Share:       s.share,
		Budget:      s.budget,
		OwnAddrs:    s.ownAddrs,
		Workload:    policy,
	}
	var out []Service
	for _, pr := range s.protocols {
		svcs, err := pr.Build(cfg, env)
		if err != nil {
			for _, sv := range out {
				sv.release()
			}
			return nil, err
		}
		out = append(out, svcs...)
	}
	return out, nil
}

// add serves ln with sv's handler as one of p's listeners.
func (p *workloadPod) add(s *Server, sv Service, ln net.Listener) *listener {
	l := &listener{name: sv.Name, key: sv.key(), addr: sv.Listen, spec: sv.Spec, svc: sv, ln: ln, done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(p.ctx)
	l.handler.Store(&handlerRef{h: sv.Handler, name: sv.Name})
	p.mu.Lock()
	p.listeners = append(p.listeners, l)
	p.svcs = append(p.svcs, sv)
	p.mu.Unlock()
	log := s.log.With(zap.String("service", sv.Name), zap.String("pod", p.w.Namespace+"/"+p.w.Pod))
	log.Info("listening for workload", zap.String("listen", ln.Addr().String()))
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		defer close(l.done)
		acceptLoop(l.ctx, l.ln, log, func(conn net.Conn) {
			ref := l.handler.Load()
			s.sessions.Add(1)
			p.sessions.Add(1)
			go func() {
				defer s.sessions.Done()
				defer p.sessions.Done()
				serveConn(l.ctx, ref.h, conn, s.log, zap.String("service", ref.name))
			}()
		})
	}()
	return l
}

// watchNetns binds the HTTP proxy in p's network namespace once its
// sandbox runs, and again whenever the sandbox is recreated, until p is
// withdrawn.
func (ps *podSet) watchNetns(p *workloadPod, cfg *config.Config, creds Credentials, policy *WorkloadPolicy) {
	s := ps.s
	log := s.log.With(zap.String("pod", p.w.Namespace+"/"+p.w.Pod))
	var bound uint64
	var hint int     // a process of the pod last seen in namespace bound
	var hostSeen int // consecutive looks that found the pod in the node's namespace
	var cur *listener
	warned := false
	for {
		wait := netnsSearchInterval
		ns, ino, err := ps.netns.PodNetns(p.w.PodUID, bound, &hint)
		if !errors.Is(err, identity.ErrHostNetwork) {
			hostSeen = 0
		}
		switch {
		case err != nil:
			if !errors.Is(err, identity.ErrHostNetwork) {
				break
			}
			// A container joins its pod's namespace a moment after its
			// cgroup: only a pod seen in the node's namespace again and
			// again is hostNetwork (which never changes); look at it
			// seldom then.
			if hostSeen++; hostSeen >= 3 {
				wait = netnsCheckInterval
				if !warned {
					log.Warn("no HTTP listener for a hostNetwork pod: its network namespace is the node's")
					warned = true
				}
			}
		case ns == nil: // still in the namespace bound in
			wait = netnsCheckInterval
		default:
			svcs, berr := ps.build(cfg, creds, policy, p.w)
			var ln net.Listener
			if berr == nil && len(svcs) > 0 {
				ln, berr = ps.netns.Listen(ns, svcs[0].Listen)
			}
			ns.Close()
			if berr != nil {
				for _, sv := range svcs {
					sv.release()
				}
				log.Error("HTTP listener in the pod's network namespace", zap.Error(berr))
				break
			}
			for _, sv := range svcs[1:] {
				sv.release()
			}
			if cur != nil {
				cur.ln.Close()
				cur.cancel()
			}
			log.Info("HTTP listener bound in the pod's network namespace", zap.Uint64("netns_inode", ino))
			cur = p.add(s, svcs[0], ln)
			bound = ino
			wait = netnsCheckInterval
		}
		t := time.NewTimer(wait)
		select {
		case <-p.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// tenantFor returns the workload key's credentials for w under rule,
// making them on the key's first pod.
func (ps *podSet) tenantFor(cfg *config.Config, rule config.WorkloadRule, w *identity.Workload) (*tenant, error) {
	key := tenantKey{namespace: w.Namespace, serviceAccount: w.ServiceAccount, serviceAccountUID: w.ServiceAccountUID}
	if a := rule.VaultAuth; a != nil {
		key.mount, key.role = a.Mount, a.Role
	}
	if t, ok := ps.tenants[key]; ok {
		t.mu.Lock()
		t.pods[w.PodUID] = w
		t.mu.Unlock()
		return t, nil
	}
	s := ps.s
	t := &tenant{key: key, pods: map[string]*identity.Workload{w.PodUID: w}}
	log := s.log.With(zap.String("namespace", key.namespace), zap.String("service_account", key.serviceAccount))
	// Only the secrets of what the rule allows.
	secrets := map[string]config.Secret{}
	for _, pg := range cfg.Postgres {
		if slices.Contains(rule.Allow, pg.Name) {
			secrets[pg.Credentials] = cfg.Secrets[pg.Credentials]
		}
	}
	if cfg.HTTP != nil {
		for _, r := range cfg.HTTP.Routes {
			if slices.Contains(rule.Allow, r.Host) {
				secrets[r.Credentials] = cfg.Secrets[r.Credentials]
			}
		}
	}
	if a := rule.VaultAuth; a != nil && cfg.Vault != nil {
		login, err := identity.NewWorkloadLogin(a.Method, a.Mount, a.Role, t.token)
		if err != nil {
			return nil, err
		}
		if t.vault, err = credentials.NewVaultClientWithLogin(*cfg.Vault, login, log); err != nil {
			return nil, err
		}
	}
	for name, sc := range secrets {
		if sc.Vault != nil && t.vault == nil {
			delete(secrets, name) // reported by config validation; never served
		}
	}
	sources, err := BuildSources(secrets, t.vault)
	if err != nil {
		if t.vault != nil {
			t.vault.Close()
		}
		return nil, err
	}
	opts := credentials.Options{Logger: log, Observer: s.metrics, RevokeOnClose: true, RevokeUnused: true}
	if v := cfg.Vault; v != nil {
		opts.FetchTimeout = v.RequestTimeout.D()
		opts.RevokeUnused = v.RevokeUnused == nil || *v.RevokeUnused
	}
	t.store = credentials.NewStore(sources, opts)
	if t.vault != nil {
		t.vault.Start(s.sessCtx)
	}
	ps.tenants[key] = t
	log.Info("workload credentials opened", zap.String("vault_role", key.role), zap.Int("secrets", len(sources)))
	return t, nil
}

// withdraw ends p: its listeners close, its sessions end at once, and the
// tenant is released. reloadMu is held.
func (ps *podSet) withdraw(p *workloadPod) {
	s := ps.s
	p.cancel()
	p.watcher.Wait()
	p.mu.Lock()
	ls, svcs := p.listeners, p.svcs
	p.listeners, p.svcs = nil, nil
	p.mu.Unlock()
	for _, l := range ls {
		l.ln.Close()
		<-l.done
	}
	drained := make(chan struct{})
	go func() {
		p.sessions.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(podDrainTimeout):
		s.log.Warn("a withdrawn pod's sessions are still ending", zap.Object("workload", p.w))
	}
	for _, sv := range svcs {
		sv.release()
	}
	labels := [2]string{"", ""}
	if p.tenant != nil {
		labels = [2]string{p.w.Namespace, p.w.ServiceAccount}
	}
	s.metrics.workloadPublished(labels[0], labels[1], -1)
	ps.release(p)
}

// fail undoes a publish that did not complete.
func (ps *podSet) fail(p *workloadPod) {
	p.cancel()
	p.watcher.Wait()
	p.mu.Lock()
	for _, l := range p.listeners {
		l.ln.Close()
	}
	p.mu.Unlock()
	labels := [2]string{"", ""}
	if p.tenant != nil {
		labels = [2]string{p.w.Namespace, p.w.ServiceAccount}
	}
	ps.s.metrics.workloadPublished(labels[0], labels[1], -1)
	ps.release(p)
}

// release drops p from its tenant; the last pod closes the tenant.
func (ps *podSet) release(p *workloadPod) {
	t := p.tenant
	if t == nil {
		return
	}
	t.mu.Lock()
	delete(t.pods, p.w.PodUID)
	last := len(t.pods) == 0
	t.mu.Unlock()
	if !last {
		return
	}
	delete(ps.tenants, t.key)
	ps.closeTenant(t, true)
}

// closeTenant closes a workload key's store (revoking its leases when
// revoke) and, when it logged in, revokes its Vault token.
func (ps *podSet) closeTenant(t *tenant, revoke bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.store.Close(ctx)
	if t.vault != nil {
		t.vault.Close()
		if revoke {
			if err := t.vault.RevokeToken(ctx); err != nil {
				ps.s.log.Warn("revoke a workload's vault token", zap.String("namespace", t.key.namespace),
					zap.String("service_account", t.key.serviceAccount), zap.Error(err))
			}
		}
	}
	ps.s.log.Info("workload credentials closed", zap.String("namespace", t.key.namespace),
		zap.String("service_account", t.key.serviceAccount), zap.Bool("revoked", revoke))
}

// stopAccepting closes every pod's listeners. s.mu is not held.
func (ps *podSet) stopAccepting(pods []*workloadPod) {
	for _, p := range pods {
		p.mu.Lock()
		ls := slices.Clone(p.listeners)
		p.mu.Unlock()
		for _, l := range ls {
			l.ln.Close()
		}
	}
}

// closeAll ends every pod and closes every tenant (at shutdown), revoking
// leases and tokens when revoke. reloadMu is held.
func (ps *podSet) closeAll(revoke bool) {
	pods := ps.snapshot()
	ps.mu.Lock()
	ps.pods = map[string]*workloadPod{}
	ps.mu.Unlock()
	for _, p := range pods {
		p.cancel()
		p.watcher.Wait()
		p.mu.Lock()
		ls, svcs := p.listeners, p.svcs
		p.mu.Unlock()
		for _, l := range ls {
			l.ln.Close()
			<-l.done
		}
		for _, sv := range svcs {
			sv.release()
		}
	}
	for key, t := range ps.tenants {
		delete(ps.tenants, key)
		ps.closeTenant(t, revoke)
	}
}

// snapshot lists the pods.
func (ps *podSet) snapshot() []*workloadPod {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]*workloadPod, 0, len(ps.pods))
	for _, p := range ps.pods {
		out = append(out, p)
	}
	return out
}

// reconfigure applies a reloaded config to every published pod: each is
// built anew (new handlers, a fresh login per workload key); the old
// listeners close and their open sessions get grace, then the old
// credentials are closed. reloadMu is held.
func (ps *podSet) reconfigure(cfg *config.Config, grace time.Duration) error {
	s := ps.s
	old := ps.snapshot()
	oldTenants := ps.tenants
	ps.tenants = map[tenantKey]*tenant{}
	next := map[string]*workloadPod{}
	var errs []error
	for _, p := range old {
		// Close the old sockets first: the new ones take their paths.
		ps.stopAccepting([]*workloadPod{p})
		np, err := ps.publish(cfg, p.w, p.dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("pod %s/%s: %w", p.w.Namespace, p.w.Pod, err))
			continue
		}
		next[p.w.PodUID] = np
	}
	ps.mu.Lock()
	ps.pods = next
	ps.mu.Unlock()
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-t.C:
		case <-s.sessCtx.Done():
		}
		for _, p := range old {
			p.cancel()
			p.watcher.Wait()
			p.sessions.Wait()
			p.mu.Lock()
			for _, sv := range p.svcs {
				sv.release()
			}
			p.mu.Unlock()
		}
		for _, t := range oldTenants {
			ps.closeTenant(t, true)
		}
	}()
	for _, p := range old {
		labels := [2]string{"", ""}
		if p.tenant != nil {
			labels = [2]string{p.w.Namespace, p.w.ServiceAccount}
		}
		s.metrics.workloadPublished(labels[0], labels[1], -1)
	}
	return errors.Join(errs...)
}

// noCredentials is the store of a pod no rule matches: the policy
// refuses before anything asks it.
type noCredentials struct{}

func (noCredentials) Acquire(_ context.Context, name string) (*credentials.Handle, error) {
	return nil, &credentials.UnavailableError{Name: name, Err: errors.New("workload not allowed")}
}

// workloadKeyString names a key in logs (never with a token).
func (k tenantKey) String() string {
	return strings.Join([]string{k.mount, k.role, k.namespace, k.serviceAccount, k.serviceAccountUID}, "/")
}

// workloadsChanged reports whether a reload changes what pods are served:
// the rules, a service, a secret, Vault or the audit settings.
func workloadsChanged(a, b *config.Config) bool {
	return !reflect.DeepEqual(a.Workloads, b.Workloads) || !reflect.DeepEqual(a.Postgres, b.Postgres) ||
		!reflect.DeepEqual(a.HTTP, b.HTTP) || !reflect.DeepEqual(a.Secrets, b.Secrets) ||
		!reflect.DeepEqual(a.Vault, b.Vault) || a.Audit.Queries != b.Audit.Queries
}
