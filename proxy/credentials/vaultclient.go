package credentials

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"go.uber.org/zap"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity"
)

// VaultClient is credproxy's authenticated session with Vault. It logs in
// with the configured method, keeps the token renewed (vault/api's
// LifetimeWatcher), logs in again when the token can no longer be renewed,
// and retries a request once after a fresh login when Vault answers 403.
type VaultClient struct {
	api   *vault.Client
	login identity.VaultLogin
	log   *zap.Logger
	// Timeout bounds one request to Vault.
	timeout time.Duration

	mu       sync.Mutex
	loggedIn bool
	lastErr  error
	epoch    int // counts logins, so concurrent 403s cause one re-login
	// owner stands for the current token: leases read with it die with it.
	// token is the token itself, to tell a new token from the same one
	// read again (method token); it is never logged.
	owner *Owner
	token string
	// loginPending: a re-login was requested and has not finished yet.
	loginPending bool

	stop    context.CancelFunc
	ctx     context.Context
	wg      sync.WaitGroup
	kick    chan struct{} // asks the token loop to log in again
	changed chan struct{} // closed (and replaced) when a login attempt ends
}

// NewVaultClient configures a client; nothing is sent until Start.
func NewVaultClient(c config.Vault, log *zap.Logger) (*VaultClient, error) {
	login, err := identity.NewVaultLogin(c.Auth)
	if err != nil {
		return nil, err
	}
	return NewVaultClientWithLogin(c, login, log)
}

// NewVaultClientWithLogin is NewVaultClient logging in with login rather
// than c.Auth: DaemonSet mode logs in as each workload, with its pod's
// token.
func NewVaultClientWithLogin(c config.Vault, login identity.VaultLogin, log *zap.Logger) (*VaultClient, error) {
	vc := vault.DefaultConfig()
	vc.Address = c.Address
	timeout := c.RequestTimeout.D()
	if timeout <= 0 {
		timeout = config.DefaultVaultRequestTimeout
	}
	vc.Timeout = timeout
	vc.MaxRetries = 0 // the Store retries with its own backoff
	if c.CAFile != "" {
		if err := vc.ConfigureTLS(&vault.TLSConfig{CACert: c.CAFile}); err != nil {
			return nil, fmt.Errorf("vault.ca_file: %w", err)
		}
	}
	if vc.Error != nil {
		return nil, fmt.Errorf("vault client: %w", vc.Error)
	}
	api, err := vault.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("vault client: %w", err)
	}
	api.ClearToken() // never pick up $VAULT_TOKEN implicitly; the token method reads it explicitly
	if c.Namespace != "" {
		api.SetNamespace(c.Namespace)
	}
	ctx, stop := context.WithCancel(context.Background())
	return &VaultClient{api: api, login: login, log: log.Named("vault"), timeout: timeout,
		ctx: ctx, stop: stop, kick: make(chan struct{}, 1), changed: make(chan struct{})}, nil
}

// Start logs in (waiting at most one request timeout) and starts keeping the
// token alive. A failed first login is logged, not fatal: the loop keeps
// trying with backoff, and Ready reports the state.
func (v *VaultClient) Start(ctx context.Context) {
	first := make(chan struct{})
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		v.tokenLoop(first)
	}()
	t := time.NewTimer(v.timeout)
	defer t.Stop()
	select {
	case <-first:
	case <-t.C:
	case <-ctx.Done():
	}
}

// Close stops renewing the token. It does not revoke it: a token given to
// credproxy (method token) is not credproxy's to end.
func (v *VaultClient) Close() {
	v.stop()
	v.wg.Wait()
}

// RevokeToken revokes the token the client logged in for (revoke-self),
// which ends every lease it created. For logins credproxy made on its own
// behalf (a workload's): a token given to credproxy is not its to end.
func (v *VaultClient) RevokeToken(ctx context.Context) error {
	v.mu.Lock()
	loggedIn := v.loggedIn
	v.mu.Unlock()
	if !loggedIn {
		return nil
	}
	return v.call(ctx, func(ctx context.Context, c *vault.Client) error {
		return c.Auth().Token().RevokeSelfWithContext(ctx, "")
	})
}

// Ready reports whether credproxy holds a valid Vault token, and if not why.
func (v *VaultClient) Ready() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.loggedIn {
		return nil
	}
	if v.lastErr != nil {
		return v.lastErr
	}
	return errors.New("not logged in to Vault yet")
}

// tokenLoop logs in, renews until the token cannot be renewed any more, and
// logs in again; on failure it retries with capped exponential backoff.
func (v *VaultClient) tokenLoop(first chan struct{}) {
	var once sync.Once
	signalFirst := func() { once.Do(func() { close(first) }) }
	defer signalFirst()
	backoff := newBackoff(500*time.Millisecond, 30*time.Second)
	for v.ctx.Err() == nil {
		secret, err := v.doLogin(v.ctx)
		signalFirst()
		if err != nil {
			v.log.Warn("vault login failed", zap.String("method", v.login.Method()), zap.Error(err))
			// Back off, unless a request is waiting on a new login.
			t := time.NewTimer(backoff.next())
			select {
			case <-v.ctx.Done():
				t.Stop()
				return
			case <-v.kick:
			case <-t.C:
			}
			t.Stop()
			continue
		}
		backoff.reset()
		v.keepAlive(secret)
	}
}

// doLogin logs in and installs the token.
func (v *VaultClient) doLogin(ctx context.Context) (*vault.Secret, error) {
	lctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	secret, err := v.login.Login(lctx, v.api)
	v.mu.Lock()
	defer v.mu.Unlock()
	close(v.changed)
	v.changed = make(chan struct{})
	v.loginPending = false
	// This login answers any request queued while it ran.
	select {
	case <-v.kick:
	default:
	}
	if err != nil {
		ve := vaultError(err)
		v.loggedIn, v.lastErr = false, &Error{Kind: KindLogin, Msg: fmt.Sprintf("vault login (%s): %s", v.login.Method(), ve.Msg), Err: ve}
		return nil, v.lastErr
	}
	v.api.SetToken(secret.Auth.ClientToken)
	v.loggedIn, v.lastErr = true, nil
	v.epoch++
	if secret.Auth.ClientToken != v.token || v.owner == nil {
		// A new token: leases read from now on are its own, and those of the
		// old one can move to them before it ends.
		old := v.owner
		v.owner, v.token = NewOwner(), secret.Auth.ClientToken
		old.Supersede()
	}
	if !secret.Auth.Renewable && secret.Auth.LeaseDuration > 0 {
		// Its end is known now: it will not be renewed.
		v.owner.Ends(time.Now().Add(time.Duration(secret.Auth.LeaseDuration) * time.Second))
	}
	v.log.Info("logged in to vault", zap.String("method", v.login.Method()),
		zap.Int("token_ttl_s", secret.Auth.LeaseDuration), zap.Bool("renewable", secret.Auth.Renewable))
	return secret, nil
}

// keepAlive renews the token until it cannot be renewed further, a re-login
// is requested, or the client closes.
func (v *VaultClient) keepAlive(secret *vault.Secret) {
	if secret.Auth.LeaseDuration == 0 {
		// A token without a TTL (root, or a periodic-less service token)
		// lives until revoked: wait for a 403 to ask for a new login.
		select {
		case <-v.ctx.Done():
		case <-v.kick:
		}
		return
	}
	w, err := v.api.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: secret})
	if err != nil {
		v.log.Error("vault token watcher", zap.Error(err))
		return
	}
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		w.Start()
	}()
	defer w.Stop()
	// The largest TTL seen: a renewal granting less was capped at the
	// token's max TTL. (A token given to credproxy may start with less than
	// its renewals grant.)
	largest := secret.Auth.LeaseDuration
	for {
		select {
		case <-v.ctx.Done():
			return
		case <-v.kick:
			return
		case r := <-w.RenewCh():
			if r.Secret == nil || r.Secret.Auth == nil {
				continue
			}
			ttl := r.Secret.Auth.LeaseDuration
			v.log.Debug("vault token renewed", zap.Int("token_ttl_s", ttl))
			if ttl < largest || !r.Secret.Auth.Renewable {
				// Capped at the token's max TTL: it ends then, and every
				// lease it created with it. Log in again now, so that fresh
				// credentials come from a token that lives on and sessions
				// can move to them before this one ends.
				end := r.RenewedAt.Add(time.Duration(ttl) * time.Second)
				v.log.Info("vault token reaches its max TTL; logging in again early",
					zap.Int("token_ttl_s", ttl), zap.Time("token_end", end))
				v.mu.Lock()
				owner := v.owner
				v.mu.Unlock()
				owner.Ends(end)
				return
			}
			largest = ttl
		case err := <-w.DoneCh():
			if err != nil {
				v.log.Warn("vault token renewal failed; logging in again", zap.Error(err))
			} else {
				v.log.Info("vault token reached its max TTL; logging in again")
			}
			return
		}
	}
}

// do runs fn with the client. When Vault answers 403 (the token expired or was
// revoked), it logs in again once and retries, as a demanding operator
// expects after a Vault restore or token revocation.
func (v *VaultClient) do(ctx context.Context, fn func(ctx context.Context, c *vault.Client) error) error {
	_, err := v.doOwned(ctx, fn)
	return err
}

// doOwned is do, returning the owner of the token the successful call
// used: what a lease it read cannot outlive.
func (v *VaultClient) doOwned(ctx context.Context, fn func(ctx context.Context, c *vault.Client) error) (*Owner, error) {
	v.mu.Lock()
	epoch, loggedIn, owner := v.epoch, v.loggedIn, v.owner
	v.mu.Unlock()
	if !loggedIn {
		if err := v.reLogin(ctx, epoch); err != nil {
			return nil, err
		}
		v.mu.Lock()
		epoch, owner = v.epoch, v.owner
		v.mu.Unlock()
	}
	err := v.call(ctx, fn)
	if !isPermissionDenied(err) {
		return owner, err
	}
	if lerr := v.reLogin(ctx, epoch); lerr != nil {
		ve := vaultError(err)
		return nil, &Error{Kind: ve.Kind, Msg: fmt.Sprintf("%s (and logging in again failed: %v)", ve.Msg, lerr), Err: ve}
	}
	v.mu.Lock()
	newOwner := v.owner
	v.mu.Unlock()
	if err = v.call(ctx, fn); err != nil {
		return nil, err
	}
	if newOwner != owner {
		// The old token was refused and a new one works: it was revoked
		// or expired, and Vault revoked its leases with it.
		v.log.Warn("vault token was revoked or expired; its leases are gone")
		owner.Gone()
	}
	return newOwner, nil
}

func (v *VaultClient) call(ctx context.Context, fn func(ctx context.Context, c *vault.Client) error) error {
	cctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	return fn(cctx, v.api)
}

// reLogin asks the token loop for a fresh login, unless another caller
// already got one since epoch, and waits for its outcome.
func (v *VaultClient) reLogin(ctx context.Context, epoch int) error {
	v.mu.Lock()
	if v.epoch != epoch && v.loggedIn {
		v.mu.Unlock()
		return nil
	}
	v.loggedIn = false
	wait := v.changed
	// One kick per login: a second caller waits for the same login rather
	// than queue another (each login may use up an AppRole secret id).
	kick := !v.loginPending
	v.loginPending = true
	v.mu.Unlock()
	if kick {
		select {
		case v.kick <- struct{}{}:
		default:
		}
	}
	select {
	case <-wait:
	case <-ctx.Done():
		return wrapf(ctx.Err(), "vault login")
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.loggedIn {
		return nil
	}
	return v.lastErr
}

// backoff is capped exponential backoff.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(2*b.cur, b.max)
	}
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }
