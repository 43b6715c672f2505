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

	"github.com/jackc/pgproto3/v2"

	"github.com/credproxy/credproxy/proxy/audit"
)

// maxAuditSQL is how much of one statement the audit log keeps; the rest of
// the message is streamed to the upstream and the record marked truncated.
const maxAuditSQL = 1 << 20

// relay streams both directions until either side ends. Without query
// auditing it copies raw connections, so plain TCP on both sides uses
// splice(2) and an idle session holds no user-space buffer.
func (s *session) relay(ctx context.Context, up *upstream) error {
	client := s.raw
	tlsClient := s.raw != net.Conn(s.client)
	if !tlsClient {
		client = s.client.Conn // bypass the handshake counter so io.Copy can splice
	}

	// Bytes read ahead during the handshake go first.
	if err := drain(up.conn, s.rd); err != nil {
		return fmt.Errorf("relay to upstream: %w", err)
	}
	if err := drain(client, up.rd); err != nil {
		return fmt.Errorf("relay to client: %w", err)
	}

	type result struct {
		n   int64
		err error
		up  bool
	}
	done := make(chan result, 2)
	go func() {
		var n int64
		var err error
		if s.h.auditQueries {
			n, err = s.copyAuditingQueries(up.conn, s.rd)
		} else {
			n, err = io.Copy(up.conn, client)
		}
		done <- result{n: n, err: err, up: true}
	}()
	go func() {
		n, err := io.Copy(client, up.conn)
		done <- result{n: n, err: err}
	}()

	var firstErr error
	for i := 0; i < 2; i++ {
		r := <-done
		if !tlsClient && !(r.up && s.h.auditQueries) {
			if r.up {
				s.client.in.Add(r.n)
			} else {
				s.client.out.Add(r.n)
			}
		}
		if i == 0 {
			// One side ended: close both so the other copy returns too.
			firstErr = r.err
			if firstErr != nil {
				side := "client"
				if !r.up {
					side = "upstream"
				}
				firstErr = fmt.Errorf("relay from %s: %w", side, firstErr)
			}
			s.raw.Close()
			up.conn.Close()
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
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
func statementText(typ byte, body []byte, truncated bool) (string, bool) {
	if !truncated {
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
