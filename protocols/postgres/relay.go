package postgres

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/proxy/audit"
	"github.com/credproxy/credproxy/proxy/credentials"
)

// maxAuditSQL is how much of one statement the audit log keeps; the rest of
// the message is streamed to the upstream and the record marked truncated.
const maxAuditSQL = 1 << 20

// relay streams both directions until either side ends. Without query
// auditing it copies raw connections, so plain TCP on both sides uses
// splice(2) and an idle session holds no user-space buffer.
func (s *session) relay(ctx context.Context, up *upstream, handle *credentials.Handle) error {
	client := s.raw
	tlsClient := s.raw != net.Conn(s.client)
	if !tlsClient {
		client = s.client.Conn // bypass the handshake counter so io.Copy can splice
	}

	// Bytes read ahead during the handshake go first (the auditing copy
	// reads them from s.rd itself).
	if !s.h.auditQueries {
		if err := drain(up.conn, s.rd); err != nil {
			return fmt.Errorf("relay to upstream: %w", err)
		}
	}
	// The message tracker must see the read-ahead too, or a later FATAL
	// could land inside a message that began in it.
	var tr msgTracker
	if b, _ := up.rd.Peek(up.rd.Buffered()); len(b) > 0 {
		tr.advance(b)
	}
	if err := drain(client, up.rd); err != nil {
		return fmt.Errorf("relay to client: %w", err)
	}

	// Shutdown (ctx) ends the session with a FATAL at a message boundary;
	// if the upstream cannot get to one in time, both sides are cut.
	term := &terminator{up: up.conn}
	s.term.Store(term)
	stopKill := context.AfterFunc(ctx, func() {
		term.terminate(fatal(codeAdminShutdown, "credproxy: terminating connection because credproxy is shutting down"))
		time.AfterFunc(2*boundaryWait, func() {
			s.raw.Close()
			up.conn.Close()
		})
	})
	defer stopKill()
	// A credential whose lease ends takes its sessions with it.
	handle.OnEnd(func() {
		term.terminate(fatal(codeAdminShutdown, "credproxy: credential lease expired"))
	})

	// Whichever direction ends first closes both connections, so the other
	// copy returns too, and its error is the session's.
	var once sync.Once
	var firstErr error
	finish := func(side string, err error) {
		once.Do(func() {
			if err != nil {
				firstErr = fmt.Errorf("relay from %s: %w", side, err)
			}
			s.raw.Close()
			up.conn.Close()
		})
	}
	// Upstream to app in a second goroutine, app to upstream in this one:
	// an idle session costs two goroutines, not three.
	toClient := make(chan int64, 1)
	go func() {
		n, err := copyToClient(client, up.conn, term, tr)
		finish("upstream", err)
		toClient <- n
	}()
	var in int64
	var err error
	if s.h.auditQueries {
		_, err = s.copyAuditingQueries(up.conn, s.rd) // s.rd counts what it reads
	} else {
		in, err = io.Copy(up.conn, client)
	}
	finish("client", err)
	out := <-toClient
	if !tlsClient { // a TLS client's bytes are counted below the TLS layer
		s.client.in.Add(in)
		s.client.out.Add(out)
	}
	var te *errTerminated
	if errors.As(firstErr, &te) {
		return te
	}
	if ctx.Err() != nil && firstErr != nil {
		return fmt.Errorf("closed by shutdown: %w", firstErr)
	}
	if errors.Is(firstErr, net.ErrClosed) {
		return nil
	}
	return firstErr
}

// drain writes what r has already buffered to w.
func drain(w io.Writer, r *bufio.Reader) error {
	n := r.Buffered()
	if n == 0 {
		return nil
	}
	b, _ := r.Peek(n)
	_, err := w.Write(b)
	_, _ = r.Discard(n)
	return err
}

// copyAuditingQueries relays app messages to the upstream, recording the
// text of each Query and Parse. Other messages, COPY data included, are
// streamed through a fixed buffer and never held whole.
func (s *session) copyAuditingQueries(dst io.Writer, src *bufio.Reader) (int64, error) {
	w := bufio.NewWriterSize(dst, 16<<10)
	buf := make([]byte, 16<<10)
	var n int64
	var hdr [5]byte
	for {
		// Flush only when no more input is waiting, so pipelines stay batched.
		if src.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return n, err
			}
		}
		if _, err := io.ReadFull(src, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = w.Flush()
			}
			return n, err
		}
		size := int64(binary.BigEndian.Uint32(hdr[1:])) - 4
		if size < 0 {
			return n, errors.New("invalid message length")
		}
		if _, err := w.Write(hdr[:]); err != nil {
			return n, err
		}
		n += 5 + size
		rest := size
		if hdr[0] == 'Q' || hdr[0] == 'P' {
			take := min(size, maxAuditSQL)
			body := make([]byte, take)
			if _, err := io.ReadFull(src, body); err != nil {
				return n, err
			}
			if _, err := w.Write(body); err != nil {
				return n, err
			}
			rest -= take
			s.auditStatement(hdr[0], body, rest > 0)
		}
		for rest > 0 {
			chunk := buf[:min(rest, int64(len(buf)))]
			if _, err := io.ReadFull(src, chunk); err != nil {
				return n, err
			}
			if _, err := w.Write(chunk); err != nil {
				return n, err
			}
			rest -= int64(len(chunk))
		}
	}
}

// auditStatement records one Query or Parse.
func (s *session) auditStatement(typ byte, body []byte, truncated bool) {
	sql, ok := statementText(typ, body, truncated)
	if !ok {
		return // malformed: the upstream will refuse it
	}
	rec := s.record(audit.EventQuery)
	rec.SQL = sql
	rec.SQLTruncated = truncated
	s.h.audit.Record(rec)
}

// statementText extracts the SQL of a Query ('Q') or Parse ('P') body with
// pgproto3; a truncated body (over maxAuditSQL) yields its leading text.
func statementText(typ byte, body []byte, truncated bool) (sql string, ok bool) {
	// The body is untrusted; pgproto3/v2's decoders index into it (Query
	// panics on an empty body), so guard them rather than crash the relay.
	defer func() {
		if recover() != nil {
			sql, ok = "", false
		}
	}()
	if !truncated {
		if len(body) == 0 {
			return "", false
		}
		switch typ {
		case 'Q':
			var q pgproto3.Query
			if q.Decode(body) != nil {
				return "", false
			}
			return q.String, true
		case 'P':
			var p pgproto3.Parse
			if p.Decode(body) != nil {
				return "", false
			}
			return p.Query, true
		}
		return "", false
	}
	if typ == 'P' { // skip the statement name
		i := bytes.IndexByte(body, 0)
		if i < 0 {
			return "", false
		}
		body = body[i+1:]
	}
	if i := bytes.IndexByte(body, 0); i >= 0 {
		body = body[:i]
	}
	return string(body), true
}
