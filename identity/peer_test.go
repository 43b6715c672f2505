package identity

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPeerOverUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := net.Dial("unix", path)
		if err == nil {
			defer c.Close()
			_, _ = c.Read(make([]byte, 1))
		}
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, want := ClientAddr(c), "unix:"+path; got != want {
		t.Errorf("ClientAddr = %q, want %q", got, want)
	}
	got := Peer(c)
	if want := "pid=" + itoa(os.Getpid()); !strings.Contains(got, want) {
		t.Errorf("Peer = %q, want it to contain %q", got, want)
	}
}

func TestPeerOverTCPIsEmpty(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			c.Close()
		}
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := Peer(c); got != "" {
		t.Errorf("Peer over TCP = %q, want empty", got)
	}
	if got := ClientAddr(c); !strings.HasPrefix(got, "127.0.0.1:") {
		t.Errorf("ClientAddr = %q", got)
	}
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	return string(b[i:])
}
