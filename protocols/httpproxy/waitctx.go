package httpproxy

import (
	"context"
	"sync"
	"time"
)

// lazyTimeout is parent with a timeout whose timer is made only when
// something waits on it: the first call to Done, Err or Deadline. A
// credential store hands out a credential it holds without looking at the
// context; only a fetch makes a request wait, and only then is a timer
// worth making. The timeout runs from that first call. stop releases the
// timer, if one was made; after stop, the context is done.
type lazyTimeout struct {
	parent context.Context
	d      time.Duration

	mu      sync.Mutex
	ctx     context.Context // nil until first asked for
	cancel  context.CancelFunc
	stopped bool
}

func (c *lazyTimeout) timed() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx == nil {
		if c.stopped {
			c.ctx, c.cancel = context.WithCancel(c.parent)
			c.cancel()
		} else {
			c.ctx, c.cancel = context.WithTimeout(c.parent, c.d)
		}
	}
	return c.ctx
}

func (c *lazyTimeout) Deadline() (time.Time, bool) { return c.timed().Deadline() }
func (c *lazyTimeout) Done() <-chan struct{}       { return c.timed().Done() }
func (c *lazyTimeout) Err() error                  { return c.timed().Err() }
func (c *lazyTimeout) Value(key any) any           { return c.parent.Value(key) }

func (c *lazyTimeout) stop() {
	c.mu.Lock()
	c.stopped = true
	cancel := c.cancel
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}
