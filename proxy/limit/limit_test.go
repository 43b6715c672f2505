package limit

import (
	"io"
	"net"
	"sync"
	"testing"
)

func TestCounter(t *testing.T) {
	var c Counter
	first, second, third := c.TryAcquire(2), c.TryAcquire(2), c.TryAcquire(2)
	if !first || !second || third {
		t.Fatal("a ceiling of 2 did not admit exactly 2")
	}
	// A reload raises the ceiling; the holders carry over.
	if !c.TryAcquire(3) || c.TryAcquire(3) || c.InUse() != 3 {
		t.Fatalf("raised ceiling: %d in use", c.InUse())
	}
	c.Release()
	if !c.TryAcquire(3) {
		t.Fatal("a released place was not taken again")
	}
	if !c.TryAcquire(0) {
		t.Fatal("0 means no ceiling")
	}
	var wg sync.WaitGroup
	var d Counter
	var got sync.Map
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if d.TryAcquire(10) {
				got.Store(i, true)
			}
		}()
	}
	wg.Wait()
	if d.InUse() != 10 {
		t.Errorf("%d admitted concurrently under a ceiling of 10", d.InUse())
	}
}

func TestShare(t *testing.T) {
	for _, tt := range []struct{ nofile, n, want int }{
		{1024, 1, 384}, // (1024 - 128 - 128) / 2
		{1024, 2, 192}, // split between listeners
		{1 << 20, 1, (1<<20 - 128 - 1<<17) / 2},
		{64, 1, minShare}, // never below the floor
		{1024, 0, 384},
	} {
		if got := Share(tt.nofile, tt.n); got != tt.want {
			t.Errorf("Share(%d, %d) = %d, want %d", tt.nofile, tt.n, got, tt.want)
		}
	}
	s, h := PostgresDefaults(384)
	if s+h != 384 || h != 48 {
		t.Errorf("PostgresDefaults(384) = %d, %d", s, h)
	}
	if OpenFileLimit() < 16 {
		t.Errorf("OpenFileLimit() = %d", OpenFileLimit())
	}
}

// Refuse writes its answer and the client reads it, not a reset, even
// when the client had sent data the server never read.
func TestRefuseIsReadNotReset(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var l Listener
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		l.Refuse(c, []byte("no\n"))
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if string(b) != "no\n" || err != nil {
		t.Errorf("client read %q, %v", b, err)
	}
	<-done
}

func TestBudget(t *testing.T) {
	b := NewBudget(256) // reserve 160: 96 descriptors, 48 connections
	if b.Max() != 48 {
		t.Fatalf("Max = %d, want 48", b.Max())
	}
	for i := range 48 {
		if !b.TryAcquire() {
			t.Fatalf("place %d refused", i)
		}
	}
	if b.TryAcquire() {
		t.Fatal("a place over the budget was given")
	}
	b.Release()
	if !b.TryAcquire() {
		t.Fatal("a released place was not given again")
	}
	var none *Budget
	if !none.TryAcquire() || none.Max() != 0 {
		t.Error("a nil Budget must have no ceiling")
	}
	none.Release()
}
