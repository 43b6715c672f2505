package postgres

import (
	"errors"
	"fmt"
	"io"
	"net"
)

// Buffer sizes of a relay direction: an idle session holds the small one
// on each side; a read that fills it switches to the large one until
// traffic calms down (COPY, large results, pipelines).
const (
	smallBuf = 2 << 10
	largeBuf = 32 << 10
)

// stream is one direction's read side: a buffer over a connection that
// the relay inspects message by message before passing bytes on. Unlike a
// bufio.Reader it can be asked to hold at least n bytes (a message header,
// the PID of a notification), and its buffer grows for bulk transfers and
// shrinks back when idle. It implements pgproto3.ChunkReader, so a
// migration can speak to the backend through it without losing what the
// relay left buffered.
type stream struct {
	conn net.Conn
	buf  []byte
	r, w int   // unread bytes are buf[r:w]
	read int64 // bytes read from conn
	last int   // bytes the last read returned
}

func newStream(conn net.Conn, readAhead []byte) *stream {
	s := &stream{conn: conn, buf: make([]byte, max(smallBuf, len(readAhead)))}
	s.w = copy(s.buf, readAhead)
	return s
}

// data is what is buffered and not consumed.
func (s *stream) data() []byte { return s.buf[s.r:s.w] }

// consume drops n bytes from the front of data. An emptied large buffer
// goes back to the small size when the last read was small: an idle
// session holds little.
func (s *stream) consume(n int) {
	s.r += n
	if s.r == s.w {
		s.r, s.w = 0, 0
		if len(s.buf) > smallBuf && s.last < smallBuf/2 {
			s.buf = make([]byte, smallBuf)
		}
	}
}

// fill reads once from conn unless at least min bytes are buffered, and
// keeps reading until they are. It returns the read error, if any, once
// what it could read is buffered.
func (s *stream) fill(min int) error {
	if s.w-s.r >= min {
		return nil
	}
	s.reserve(min)
	for {
		if err := s.readOnce(); err != nil {
			return err
		}
		if s.w-s.r >= min {
			return nil
		}
	}
}

// readMore reads once from conn into the buffer, whatever is buffered.
func (s *stream) readMore() error {
	s.reserve(s.w - s.r + 1)
	return s.readOnce()
}

// readOnce reads into the free space after w (reserve made some). A read
// that fills a small buffer grows it for what is likely to follow.
func (s *stream) readOnce() error {
	n, err := s.conn.Read(s.buf[s.w:])
	s.w += n
	s.read += int64(n)
	s.last = n
	if s.w == len(s.buf) && len(s.buf) < largeBuf {
		nb := make([]byte, largeBuf)
		copy(nb, s.buf[s.r:s.w])
		s.r, s.w, s.buf = 0, s.w-s.r, nb
	}
	return err
}

// reserve makes room for need unread bytes plus at least one more read.
func (s *stream) reserve(need int) {
	unread := s.w - s.r
	if s.w < len(s.buf) && len(s.buf)-s.r >= need {
		return
	}
	size := len(s.buf)
	for size < need+1 {
		size *= 2 // need+1: room for one more read beyond what is needed
	}
	if size == len(s.buf) && s.r > 0 {
		copy(s.buf, s.buf[s.r:s.w])
	} else {
		nb := make([]byte, size)
		copy(nb, s.buf[s.r:s.w])
		s.buf = nb
	}
	s.r, s.w = 0, unread
}

// Next implements pgproto3.ChunkReader: exactly n bytes, valid until the
// next call.
func (s *stream) Next(n int) ([]byte, error) {
	if err := s.fill(n); err != nil && s.w-s.r < n {
		if errors.Is(err, io.EOF) && s.w > s.r {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	b := s.buf[s.r : s.r+n]
	s.consume(n)
	return b, nil
}

// cappedNext is Next for a peer that is not trusted to send sensible
// lengths (the handshake, a migration's own queries).
type cappedNext struct {
	s   *stream
	max int
}

func (c cappedNext) Next(n int) ([]byte, error) {
	if n > c.max {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", errTooLarge, n, c.max)
	}
	return c.s.Next(n)
}
