package postgres

import (
	"bytes"
	"encoding/binary"
	"errors"

	"github.com/jackc/pgproto3/v2"
)

// The relay passes bytes on as they arrive, but follows the message framing
// of both directions: it must know when the backend is idle (a migration
// may swap it then), where a message ends (a FATAL may only be written
// there), and a few messages' contents.

// errBadLength is a message whose length field is below 4.
var errBadLength = errors.New("invalid message length")

// framing is the position in one direction's message stream.
type framing struct {
	typ    byte
	size   int // body length of the current message
	off    int // body bytes of it seen
	inBody bool
}

// atBoundary reports whether the stream is between two messages.
func (f *framing) atBoundary() bool { return !f.inBody }

// header reads a message header at data[0:5]; ok is false when fewer than
// five bytes are there.
func header(data []byte) (typ byte, size int, ok bool, err error) {
	if len(data) < 5 {
		return 0, 0, false, nil
	}
	n := int64(binary.BigEndian.Uint32(data[1:5])) - 4
	if n < 0 {
		return 0, 0, false, errBadLength
	}
	return data[0], int(n), true, nil
}

// appScan follows the app's messages.
type appScan struct {
	framing
	// collect keeps the first collect bytes of each Query and Parse body
	// for onStatement; 0 keeps nothing.
	collect     int
	body        []byte
	onStatement func(typ byte, body []byte, truncated bool)
}

// appChunk is what one scan saw.
type appChunk struct {
	syncs int // sync points: Query, Sync, FunctionCall (each answered by one ReadyForQuery)
	// after counts the messages after the last sync point that leave work
	// in flight (not COPY data, not Flush).
	after       int
	terminate   bool // Terminate
	terminateAt int  // where the first Terminate starts in the data scanned
}

// scan walks data and returns how much of it was consumed: all of it,
// except a trailing message header that is not complete yet.
func (a *appScan) scan(data []byte) (int, appChunk, error) {
	var c appChunk
	i := 0
	for i < len(data) {
		if !a.inBody {
			typ, size, ok, err := header(data[i:])
			if err != nil {
				return i, c, err
			}
			if !ok {
				break
			}
			i += 5
			a.typ, a.size, a.off, a.inBody = typ, size, 0, true
			switch typ {
			case 'Q', 'S', 'F':
				c.syncs++
				c.after = 0
			case 'd', 'c', 'f', 'H':
			case 'X':
				if !c.terminate {
					c.terminateAt = i - 5
				}
				c.terminate = true
			default:
				c.after++
			}
			if a.collect > 0 && (typ == 'Q' || typ == 'P') {
				if len(data)-i >= size {
					// Whole in this chunk: no copy.
					a.statement(data[i:i+min(size, a.collect)], size > a.collect)
					i += size
					a.inBody = false
					continue
				}
				a.body = a.body[:0]
			}
		}
		k := min(len(data)-i, a.size-a.off)
		if a.collect > 0 && (a.typ == 'Q' || a.typ == 'P') && len(a.body) < a.collect {
			a.body = append(a.body, data[i:i+min(k, a.collect-len(a.body))]...)
		}
		a.off += k
		i += k
		if a.off == a.size {
			a.inBody = false
			if a.collect > 0 && (a.typ == 'Q' || a.typ == 'P') {
				a.statement(a.body, a.size > a.collect)
				if cap(a.body) > smallBuf {
					a.body = nil // do not keep a large statement's buffer
				}
			}
		}
	}
	return i, c, nil
}

func (a *appScan) statement(body []byte, truncated bool) {
	if a.onStatement != nil {
		a.onStatement(a.typ, body, truncated)
	}
}

// maxInspect bounds the ParameterStatus and ErrorResponse messages the
// relay reads whole; larger ones pass uninspected.
const maxInspect = smallBuf - 5

// backendScan follows the backend's messages.
type backendScan struct {
	framing
	// ownPID, when not 0, is the backend's process id: in a notification it
	// sent to itself it is replaced by appPID, the one the app was given.
	ownPID, appPID uint32
	// onParam hears every ParameterStatus.
	onParam func(name, value string)
	// fatal is the last FATAL or PANIC ErrorResponse the backend sent.
	fatal *pgproto3.ErrorResponse
	// failed: the backend sent an ErrorResponse (of any severity).
	failed bool
}

// backendChunk is what one scan saw.
type backendChunk struct {
	readys int  // ReadyForQuery messages
	tx     byte // the last one's status
}

// scan walks data and returns how much of it may be passed on now, and how
// many bytes from there it needs to see before it can go on: a message
// header, a notification's process id, a ReadyForQuery's status, a small
// ParameterStatus or ErrorResponse whole. need is 0 when all was consumed.
// It may rewrite data in place (a notification's process id).
func (b *backendScan) scan(data []byte) (n, need int, c backendChunk, err error) {
	i := 0
	for i < len(data) {
		if !b.inBody {
			typ, size, ok, err := header(data[i:])
			if err != nil {
				return i, 0, c, err
			}
			if !ok {
				return i, 5, c, nil
			}
			want := 0
			switch typ {
			case 'Z':
				want = min(size, 1)
			case 'A':
				want = min(size, 4)
			case 'S', 'E':
				want = min(size, maxInspect)
			}
			if len(data)-i-5 < want {
				return i, 5 + want, c, nil
			}
			body := data[i+5 : i+5+want]
			switch typ {
			case 'Z':
				c.readys++
				if want == 1 {
					c.tx = body[0]
				}
			case 'A':
				if want == 4 && b.ownPID != 0 && binary.BigEndian.Uint32(body) == b.ownPID {
					binary.BigEndian.PutUint32(body, b.appPID)
				}
			case 'S':
				if want == size && b.onParam != nil {
					if name, value, ok := parameterStatus(body); ok {
						b.onParam(name, value)
					}
				}
			case 'E':
				b.failed = true
				if sev := errorSeverity(body); sev == "FATAL" || sev == "PANIC" {
					var e pgproto3.ErrorResponse
					if want == size && e.Decode(body) == nil {
						b.fatal = &e
					} else {
						b.fatal = &pgproto3.ErrorResponse{Severity: sev, SeverityUnlocalized: sev}
					}
				}
			}
			i += 5
			b.typ, b.size, b.off, b.inBody = typ, size, 0, true
		}
		k := min(len(data)-i, b.size-b.off)
		b.off += k
		i += k
		if b.off == b.size {
			b.inBody = false
		}
	}
	return i, 0, c, nil
}

// parameterStatus decodes a ParameterStatus body: name NUL value NUL.
func parameterStatus(body []byte) (name, value string, ok bool) {
	n := bytes.IndexByte(body, 0)
	if n < 0 {
		return "", "", false
	}
	rest := body[n+1:]
	v := bytes.IndexByte(rest, 0)
	if v < 0 {
		return "", "", false
	}
	return string(body[:n]), string(rest[:v]), true
}

// errorSeverity finds the severity of an ErrorResponse body (or a prefix
// of one): the V field (never localized), else the S field.
func errorSeverity(body []byte) string {
	var sev string
	for len(body) > 0 && body[0] != 0 {
		typ := body[0]
		end := bytes.IndexByte(body[1:], 0)
		if end < 0 {
			break
		}
		val := string(body[1 : 1+end])
		switch typ {
		case 'V':
			return val
		case 'S':
			sev = val
		}
		body = body[2+end:]
	}
	return sev
}
