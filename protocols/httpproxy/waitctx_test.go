package httpproxy

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/credproxy/credproxy/proxy/credentials"
)

type ctxKey struct{}

func TestLazyTimeout(t *testing.T) {
	t.Run("no timer until waited on, then the timeout", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			parent := context.WithValue(context.Background(), ctxKey{}, "v")
			c := &lazyTimeout{parent: parent, d: time.Second}
			if c.Value(ctxKey{}) != "v" {
				t.Error("Value does not come from the parent")
			}
			time.Sleep(time.Hour) // nothing runs while nobody waits
			if c.ctx != nil {
				t.Fatal("a timer was made before anyone waited")
			}
			start := time.Now()
			<-c.Done()
			if d := time.Since(start); d != time.Second {
				t.Errorf("done after %s, want 1s from the first wait", d)
			}
			if !errors.Is(c.Err(), context.DeadlineExceeded) {
				t.Errorf("Err = %v", c.Err())
			}
			c.stop()
		})
	})
	t.Run("the parent ends it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			parent, cancel := context.WithCancel(context.Background())
			c := &lazyTimeout{parent: parent, d: time.Hour}
			done := c.Done()
			cancel()
			<-done
			if !errors.Is(c.Err(), context.Canceled) {
				t.Errorf("Err = %v", c.Err())
			}
			c.stop()
		})
	})
	t.Run("done after stop", func(t *testing.T) {
		c := &lazyTimeout{parent: context.Background(), d: time.Hour}
		c.stop()
		select {
		case <-c.Done():
		default:
			t.Error("not done after stop")
		}
	})
}

// hangingCredentials never has a credential: Acquire waits for its
// context, as a store waiting on a fetch does.
type hangingCredentials struct{ waited chan time.Duration }

func (h hangingCredentials) Acquire(ctx context.Context, name string) (*credentials.Handle, error) {
	start := time.Now()
	<-ctx.Done()
	h.waited <- time.Since(start)
	return nil, &credentials.UnavailableError{Name: name, Err: ctx.Err()}
}

// A request whose credential does not come gets 503 after
// credentialTimeout, not never.
func TestCredentialWaitTimesOut(t *testing.T) {
	dir := caDir(t)
	synctest.Test(t, func(t *testing.T) {
		w := newPipeWorld(t, dir, nil, func(rw http.ResponseWriter, r *http.Request) {
			t.Error("the upstream got a request without a credential")
		})
		defer w.close()
		waited := make(chan time.Duration, 1)
		w.p.creds = hangingCredentials{waited: waited}
		c, br := w.conn()
		defer c.Close()
		resp, body := roundTrip(t, c, br, "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n")
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "credential") {
			t.Errorf("%d %q, want 503 naming the credential", resp.StatusCode, body)
		}
		if d := <-waited; d != credentialTimeout {
			t.Errorf("waited %s for the credential, want %s", d, credentialTimeout)
		}
	})
}
