package vaulttest

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// leaseServer starts a server with a fakeLeaser mounted at fake/.
func leaseServer(t *testing.T, f *fakeLeaser, opts Options) (*Server, *vault.Client) {
	t.Helper()
	srv, client := start(t, opts)
	mountFake(srv, "fake/", f)
	return srv, client
}

func newLease(t *testing.T, c *vault.Client, name string) (*vault.Secret, string) {
	t.Helper()
	s := mustRead(t, c, "fake/creds/"+name)
	return s, s.Data["id"].(string)
}

func TestLeaseRegistration(t *testing.T) {
	f := &fakeLeaser{ttl: time.Hour, max: 2 * time.Hour}
	srv, client := leaseServer(t, f, Options{})
	s, _ := newLease(t, client, "app")
	id, rest, _ := strings.Cut(s.LeaseID, "fake/creds/app/")
	if id != "" || len(rest) != 24 || s.LeaseDuration != 3600 || !s.Renewable {
		t.Errorf("secret = lease %q duration %d renewable %v", s.LeaseID, s.LeaseDuration, s.Renewable)
	}
	if got := srv.Leases("fake/creds/"); len(got) != 1 || got[0] != s.LeaseID {
		t.Errorf("Leases = %v", got)
	}

	l, err := client.Sys().Lookup(s.LeaseID)
	if err != nil {
		t.Fatal(err)
	}
	if l.Data["id"] != s.LeaseID || l.Data["renewable"] != true || l.Data["last_renewal"] != nil ||
		l.Data["issue_time"] == nil || l.Data["expire_time"] == nil {
		t.Errorf("lookup = %v", l.Data)
	}
	if ttl := jsonInt(t, l.Data["ttl"]); ttl < 3590 || ttl > 3600 {
		t.Errorf("lookup ttl = %d", ttl)
	}
	_, err = client.Sys().Lookup("fake/creds/app/nope")
	wantAPIError(t, err, http.StatusBadRequest, "invalid lease")

	t.Run("renew", func(t *testing.T) {
		r, err := client.Sys().Renew(s.LeaseID, 600)
		if err != nil || r.LeaseID != s.LeaseID || r.LeaseDuration != 600 || !r.Renewable {
			t.Fatalf("renew = %+v, %v", r, err)
		}
		r, err = client.Sys().Renew(s.LeaseID, 0)
		if err != nil || r.LeaseDuration != 3600 {
			t.Fatalf("renew without increment = %+v, %v", r, err)
		}
		l, _ := client.Sys().Lookup(s.LeaseID)
		if l.Data["last_renewal"] == nil {
			t.Errorf("lookup after renew = %v", l.Data)
		}
		if got := f.increments(); len(got) != 2 || got[0] != 600*time.Second || got[1] != 0 {
			t.Errorf("backend saw increments %v", got)
		}
	})
	t.Run("not renewable", func(t *testing.T) {
		fixed, _ := newLease(t, client, "fixed")
		if fixed.Renewable {
			t.Fatal("fixed lease is renewable")
		}
		_, err := client.Sys().Renew(fixed.LeaseID, 60)
		wantAPIError(t, err, http.StatusBadRequest, "lease is not renewable")
	})
	t.Run("revoke", func(t *testing.T) {
		s, id := newLease(t, client, "app")
		if err := client.Sys().Revoke(s.LeaseID); err != nil {
			t.Fatal(err)
		}
		if !f.isRevoked(id) {
			t.Error("backend did not revoke")
		}
		if err := client.Sys().Revoke(s.LeaseID); err != nil {
			t.Errorf("revoking a revoked lease: %v", err)
		}
		_, err := client.Sys().Renew(s.LeaseID, 0)
		wantAPIError(t, err, http.StatusBadRequest, "lease not found")
	})
	t.Run("revoke async", func(t *testing.T) {
		s, id := newLease(t, client, "app")
		raw(t, srv, http.MethodPut, "sys/leases/revoke", srv.RootToken(), map[string]any{"lease_id": s.LeaseID, "sync": false}).
			wantStatus(t, http.StatusAccepted)
		eventually(t, 5*time.Second, func() error {
			if !f.isRevoked(id) {
				return errors.New("not revoked yet")
			}
			return nil
		})
	})
	t.Run("revoke-prefix needs sudo", func(t *testing.T) {
		_, id1 := newLease(t, client, "bulk")
		_, id2 := newLease(t, client, "bulk")
		if err := client.Sys().PutPolicy("leases", `path "sys/leases/revoke-prefix/*" { capabilities = ["update"] }`); err != nil {
			t.Fatal(err)
		}
		tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"leases"}})
		if err != nil {
			t.Fatal(err)
		}
		err = clientWithToken(t, client, tok.Auth.ClientToken).Sys().RevokePrefix("fake/creds/bulk")
		wantAPIError(t, err, http.StatusForbidden, "permission denied")
		if err := client.Sys().RevokePrefix("fake/creds/bulk"); err != nil {
			t.Fatal(err)
		}
		if !f.isRevoked(id1) || !f.isRevoked(id2) || len(srv.Leases("fake/creds/bulk")) != 0 {
			t.Errorf("revoke-prefix left leases: %v", srv.Leases("fake/creds/bulk"))
		}
	})
	t.Run("lease list needs sudo and lists a level", func(t *testing.T) {
		l, err := client.Logical().List("sys/leases/lookup/fake/creds/")
		if err != nil {
			t.Fatal(err)
		}
		if keys := l.Data["keys"].([]any); len(keys) != 2 || keys[0] != "app/" || keys[1] != "fixed/" {
			t.Errorf("keys = %v", keys)
		}
	})
}

func TestLeaseTTLs(t *testing.T) {
	skipShort(t)
	t.Parallel()

	t.Run("renewal capped at issue time plus max ttl", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: 2 * time.Second, max: 5 * time.Second}
		_, client := leaseServer(t, f, Options{})
		s, _ := newLease(t, client, "app")
		time.Sleep(time.Second)
		if _, err := client.Sys().Renew(s.LeaseID, 2); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond)
		r, err := client.Sys().Renew(s.LeaseID, 10)
		if err != nil {
			t.Fatal(err)
		}
		if r.LeaseDuration < 2 || r.LeaseDuration > 3 || len(r.Warnings) != 1 ||
			!strings.Contains(r.Warnings[0], `TTL of "10s" exceeded the effective max_ttl of "`) ||
			!strings.HasSuffix(r.Warnings[0], `; TTL value is capped accordingly`) {
			t.Errorf("renew = duration %d, warnings %q", r.LeaseDuration, r.Warnings)
		}
	})
	t.Run("mount max ttl caps the lease", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: time.Hour}
		_, client := leaseServer(t, f, Options{MaxLeaseTTL: 30 * time.Second})
		s := mustRead(t, client, "fake/creds/app")
		if s.LeaseDuration != 30 || len(s.Warnings) != 1 {
			t.Errorf("lease = %d, warnings %q", s.LeaseDuration, s.Warnings)
		}
	})
	t.Run("expired leases are revoked", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: 1 * time.Second}
		srv, client := leaseServer(t, f, Options{})
		s, id := newLease(t, client, "app")
		eventually(t, 5*time.Second, func() error {
			if !f.isRevoked(id) || len(srv.Leases("")) != 0 {
				return errors.New("not revoked yet")
			}
			return nil
		})
		_, err := client.Sys().Renew(s.LeaseID, 60)
		wantAPIError(t, err, http.StatusBadRequest, "lease not found")
	})
	t.Run("a failed revocation is retried", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: 1 * time.Second, failNext: 2}
		srv, client := leaseServer(t, f, Options{RevokeRetryBase: 100 * time.Millisecond})
		_, id := newLease(t, client, "app")
		eventually(t, 10*time.Second, func() error {
			if !f.isRevoked(id) || len(srv.Leases("")) != 0 {
				return fmt.Errorf("not revoked yet (failures %d)", f.failures())
			}
			return nil
		})
	})
	t.Run("a failed sync revocation is an error", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: time.Hour, failNext: 1}
		srv, client := leaseServer(t, f, Options{})
		s, _ := newLease(t, client, "app")
		err := client.Sys().Revoke(s.LeaseID)
		wantAPIError(t, err, http.StatusBadRequest, "failed to revoke entry", "injected failure")
		if len(srv.Leases("")) != 1 {
			t.Error("lease dropped despite the failure")
		}
	})
	t.Run("revoking a token revokes its leases", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: time.Hour}
		srv, client := leaseServer(t, f, Options{})
		tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		tc := clientWithToken(t, client, tok.Auth.ClientToken)
		_, id := newLease(t, tc, "app")
		_, rootID := newLease(t, client, "app")
		if err := tc.Auth().Token().RevokeSelf(""); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, func() error {
			if !f.isRevoked(id) {
				return errors.New("lease of the revoked token not revoked")
			}
			return nil
		})
		if f.isRevoked(rootID) || len(srv.Leases("")) != 1 {
			t.Error("another token's lease was revoked")
		}
	})
	t.Run("an expiring token revokes its leases", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: time.Hour}
		_, client := leaseServer(t, f, Options{})
		tok, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1s"})
		if err != nil {
			t.Fatal(err)
		}
		_, id := newLease(t, clientWithToken(t, client, tok.Auth.ClientToken), "app")
		eventually(t, 5*time.Second, func() error {
			if !f.isRevoked(id) {
				return errors.New("not revoked yet")
			}
			return nil
		})
	})
	t.Run("nothing expires while stopped", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: 1 * time.Second}
		srv, client := leaseServer(t, f, Options{})
		_, id := newLease(t, client, "app")
		srv.Stop()
		time.Sleep(2 * time.Second)
		if f.isRevoked(id) {
			t.Fatal("a stopped server revoked a lease")
		}
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, func() error {
			if !f.isRevoked(id) {
				return errors.New("overdue lease not revoked after restart")
			}
			return nil
		})
	})
	t.Run("vault api lifetime watcher", func(t *testing.T) {
		t.Parallel()
		f := &fakeLeaser{ttl: 2 * time.Second, max: 5 * time.Second}
		_, client := leaseServer(t, f, Options{})
		s, _ := newLease(t, client, "app")
		w, err := client.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: s, Increment: 2})
		if err != nil {
			t.Fatal(err)
		}
		go w.Start()
		defer w.Stop()
		renewed := 0
		for {
			select {
			case <-w.RenewCh():
				renewed++
			case err := <-w.DoneCh():
				if err != nil {
					t.Fatalf("watcher: %v", err)
				}
				if renewed == 0 {
					t.Error("watcher never renewed")
				}
				return
			case <-time.After(15 * time.Second):
				t.Fatal("watcher did not stop at the max TTL")
			}
		}
	})
}

// TestConcurrentLeases runs creds, renewals, lookups and revocations at
// once, for the race detector.
func TestConcurrentLeases(t *testing.T) {
	f := &fakeLeaser{ttl: time.Hour}
	srv, client := leaseServer(t, f, Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := client.Logical().Read("fake/creds/app")
			if err != nil {
				errs <- err
				return
			}
			if _, err := client.Sys().Renew(s.LeaseID, 60); err != nil {
				errs <- err
			}
			if _, err := client.Sys().Lookup(s.LeaseID); err != nil {
				errs <- err
			}
			if _, err := client.Auth().Token().Create(&vault.TokenCreateRequest{TTL: "1m"}); err != nil {
				errs <- err
			}
			if err := client.Sys().Revoke(s.LeaseID); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := len(srv.Leases("")); n != 0 {
		t.Errorf("%d leases left", n)
	}
	if n := srv.Count("fake/creds/app"); n != 20 {
		t.Errorf("Count = %d, want 20", n)
	}
}
