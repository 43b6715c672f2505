package credentials

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	vault "github.com/hashicorp/vault/api"
)

func TestKindOf(t *testing.T) {
	dialErr := &url.Error{Op: "Get", URL: "http://127.0.0.1:1/v1/x",
		Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", errors.New("connection refused"))}}
	timeoutErr := &url.Error{Op: "Get", URL: "http://127.0.0.1:1/v1/x", Err: &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}}
	tests := []struct {
		name string
		err  error
		want Kind
	}{
		{"403", vaultError(&vault.ResponseError{StatusCode: 403, Errors: []string{"permission denied"}}), KindDenied},
		{"404", vaultError(&vault.ResponseError{StatusCode: 404}), KindNotFound},
		{"503 sealed", vaultError(&vault.ResponseError{StatusCode: 503, Errors: []string{"Vault is sealed"}}), KindUnreachable},
		{"400", vaultError(&vault.ResponseError{StatusCode: 400, Errors: []string{"invalid lease"}}), KindOther},
		{"connection refused", vaultError(dialErr), KindUnreachable},
		{"read timeout", vaultError(timeoutErr), KindTimeout},
		{"context deadline", context.DeadlineExceeded, KindTimeout},
		{"wrapped with a prefix", wrapf(vaultError(&vault.ResponseError{StatusCode: 403}), "vault read x"), KindDenied},
		{"wrapped by fmt", fmt.Errorf("outer: %w", &Error{Kind: KindLogin, Msg: "m"}), KindLogin},
		// The kind comes from the type, never the text: these messages
		// carry every word the old string matching looked for.
		{"words are not kinds", errors.New("vault unreachable: 403 permission denied, login timeout, 404"), KindOther},
		{"a reworded message keeps its kind", &Error{Kind: KindDenied, Msg: "the source said no"}, KindDenied},
		{"nil", nil, KindOther},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := KindOf(tc.err); got != tc.want {
				t.Errorf("KindOf(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

func TestVaultErrorScrubs(t *testing.T) {
	const leaseID = "database/creds/app/AbCdEf123456"
	raw := &url.Error{Op: "Put", URL: "http://vault:8200/v1/sys/leases/renew?lease=" + leaseID,
		Err: &net.OpError{Op: "dial", Err: errors.New("connection refused")}}
	err := wrapf(vaultError(raw, leaseID), "vault renew lease %s", shortHash(Lease{ID: leaseID}))
	for _, s := range []string{leaseID, "vault:8200", "/v1/"} {
		if strings.Contains(err.Error(), s) {
			t.Errorf("error text %q contains %q", err.Error(), s)
		}
	}
	// The cause is kept for errors.As, only its text is not shown.
	var ue *url.Error
	if !errors.As(err, &ue) {
		t.Errorf("the *url.Error cause is lost")
	}
	resp := vaultError(&vault.ResponseError{StatusCode: 400, Errors: []string{"lease " + leaseID + " not found"}}, leaseID)
	if strings.Contains(resp.Error(), leaseID) {
		t.Errorf("error text %q contains the lease id", resp.Error())
	}
}

// The Store retries a fetch only when the kind says another try may work.
func TestStoreRetriesByKind(t *testing.T) {
	tests := []struct {
		kind      Kind
		wantCalls int64
	}{
		// 5s of retries: at 0, 100ms, 300ms, 700ms, 1.5s, 2.5s, 3.5s, 4.5s.
		{KindUnreachable, 8},
		{KindTimeout, 8},
		{KindDenied, 1},
		{KindNotFound, 1},
		{KindLogin, 1},
		{KindOther, 1},
	}
	for _, tc := range tests {
		t.Run(tc.kind.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				src := &fakeSource{fetch: func(int64) (*Credential, error) {
					return nil, &Error{Kind: tc.kind, Msg: "no"}
				}}
				s := newTestStore(t, map[string]Source{"x": src}, Options{FetchTimeout: 5 * time.Second})
				if h, err := s.Acquire(context.Background(), "x"); err == nil {
					h.Release()
					t.Fatal("Acquire succeeded")
				}
				if got := src.calls.Load(); got != tc.wantCalls {
					t.Errorf("Fetch called %d times, want %d", got, tc.wantCalls)
				}
			})
		})
	}
}
