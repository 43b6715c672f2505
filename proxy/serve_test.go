package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// handlerFunc is a ConnHandler.
type handlerFunc func(ctx context.Context, conn net.Conn, id string) error

func (f handlerFunc) ServeConn(ctx context.Context, conn net.Conn, id string) error {
	return f(ctx, conn, id)
}

// Serve serves each connection under its own session id, survives a
// handler's panic, and returns once ctx has ended and every session with
// it.
func TestServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	ids := map[string]bool{}
	h := handlerFunc(func(ctx context.Context, conn net.Conn, id string) error {
		defer conn.Close()
		mu.Lock()
		ids[id] = true
		n := len(ids)
		mu.Unlock()
		if n == 1 {
			panic("the first session's bug")
		}
		_, _ = io.WriteString(conn, "hello "+id+"\n")
		<-ctx.Done() // held open until Serve's ctx ends
		return nil
	})
	core, logs := observer.New(zapcore.ErrorLevel)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, h, zap.New(core)) }()

	first, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_ = first.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, _ := io.ReadAll(first); len(b) != 0 {
		t.Errorf("the panicking session sent %q", b)
	}
	second, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	_ = second.SetReadDeadline(time.Now().Add(10 * time.Second))
	line := make([]byte, len("hello ")+24+1)
	if _, err := io.ReadFull(second, line); err != nil {
		t.Fatalf("second session: %v", err)
	}
	// The handler's deferred Close runs as the panic unwinds, before
	// Serve's recover logs it: the first client can see EOF first.
	for i := 0; i < 1000 && logs.FilterMessage("session panicked").Len() == 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if n := logs.FilterMessage("session panicked").Len(); n != 1 {
		t.Errorf("%d panics logged, want 1", n)
	}

	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its ctx ended")
	}
	// Asked of the listener itself: a dial could reach whatever took the
	// port since, or connect to itself.
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Serve returned: %v, want the listener closed", err)
	}
	if len(ids) != 2 {
		t.Errorf("%d session ids for 2 sessions", len(ids))
	}
}

// failingListener fails every Accept until it is closed.
type failingListener struct {
	net.Listener
	mu     sync.Mutex
	calls  int
	closed chan struct{}
}

func (l *failingListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.calls++
	l.mu.Unlock()
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
		return nil, errors.New("accept: too many open files")
	}
}

func (l *failingListener) Close() error {
	close(l.closed)
	return nil
}

// An accept error is retried after a wait that doubles up to a second:
// the loop never spins.
func TestAcceptLoopBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ln := &failingListener{closed: make(chan struct{})}
		done := make(chan struct{})
		go func() {
			defer close(done)
			acceptLoop(context.Background(), ln, zap.NewNop(), func(net.Conn) { t.Error("served a connection") })
		}()
		// 5+10+20+...+640ms, then 1s each: 10 tries in the first 2.275s.
		time.Sleep(2275*time.Millisecond + time.Millisecond)
		synctest.Wait()
		ln.mu.Lock()
		calls := ln.calls
		ln.mu.Unlock()
		if calls != 10 {
			t.Errorf("%d accepts in the first 2.275s, want 10", calls)
		}
		ln.Close()
		<-done
	})
}
