package integration

import (
	"bytes"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/integration/pgtest"
)

// TestStartupWireMatchesPostgres sends the same raw startup bytes to
// PostgreSQL 15 and to credproxy in front of it and compares what comes
// back: the NegotiateProtocolVersion for a 3.2 client with a protocol
// option, byte for byte, and how fast a bad startup length is refused.
func TestStartupWireMatchesPostgres(t *testing.T) {
	skipShort(t)
	t.Parallel()
	pg := startPG(t, pgtest.Options{})
	svc := pgService("app", pg.Addr(), "app", config.PostgresTLS{})
	svc.StartupTimeout = config.Duration(20 * time.Second) // a wait would show
	cfg := &config.Config{
		Secrets:  map[string]config.Secret{"app": staticSecret(pgtest.ScramUser, pg.Password(pgtest.ScramUser))},
		Postgres: []config.Postgres{svc},
	}
	p := startProxy(t, cfg)
	targets := []struct{ name, addr string }{{"postgres", pg.Addr()}, {"credproxy", p.addr(t, "app")}}

	// First message of each answer to a 3.2 startup with a _pq_ option.
	params := "user\x00" + pgtest.ScramUser + "\x00database\x00postgres\x00_pq_.credproxy_test\x00on\x00\x00"
	startup := binary.BigEndian.AppendUint32(nil, uint32(8+len(params)))
	startup = binary.BigEndian.AppendUint32(startup, 3<<16|2)
	startup = append(startup, params...)
	var negotiate [2][]byte
	for i, tg := range targets {
		c := rawConn(t, tg.addr)
		if _, err := c.Write(startup); err != nil {
			t.Fatalf("%s: write: %v", tg.name, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		hdr := make([]byte, 5)
		if _, err := io.ReadFull(c, hdr); err != nil {
			t.Fatalf("%s: read: %v", tg.name, err)
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(c, body); err != nil {
			t.Fatalf("%s: read: %v", tg.name, err)
		}
		negotiate[i] = append(hdr, body...)
	}
	if negotiate[0][0] != 'v' {
		t.Fatalf("postgres answered %q first; the test expects NegotiateProtocolVersion", negotiate[0][0])
	}
	if !bytes.Equal(negotiate[0], negotiate[1]) {
		t.Errorf("NegotiateProtocolVersion differs:\npostgres  %x\ncredproxy %x", negotiate[0], negotiate[1])
	}

	// A startup length below 8, and nothing else: both close at once.
	// (PostgreSQL closes without a word; credproxy adds a FATAL 08P01.)
	for _, tg := range targets {
		c := rawConn(t, tg.addr)
		if _, err := c.Write([]byte{0, 0, 0, 4}); err != nil {
			t.Fatalf("%s: write: %v", tg.name, err)
		}
		data, closed, err := readUntilClosed(c, 10*time.Second)
		if err != nil || !closed {
			t.Errorf("%s: closed %v, err %v after a length of 4; want it closed at once", tg.name, closed, err)
		}
		t.Logf("%s answered a length of 4 with %q", tg.name, data)
	}
}
