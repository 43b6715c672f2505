package postgres

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pgproto3/v2"
)

// receive reads one message from a backend during credproxy's own
// conversations with it (the login, a migration's queries) and decodes the
// kinds credproxy expects. It stands in for pgproto3.Frontend.Receive,
// whose DataRow decoding panics on a negative field length
// (GO-2026-4518, not fixed in pgproto3/v2): a broken or hostile backend
// must never crash credproxy. Rows are decoded here; every other decoder is
// run under a recover, so that a panic in one is an error too.
//
// The message may refer to r's buffer: it is valid until the next read.
func receive(r pgproto3.ChunkReader) (pgproto3.BackendMessage, error) {
	hdr, err := r.Next(5)
	if err != nil {
		return nil, err // io.EOF between messages: the backend closed
	}
	typ := hdr[0]
	n := int(int32(binary.BigEndian.Uint32(hdr[1:]))) - 4
	if n < 0 {
		return nil, fmt.Errorf("%w: %q message", errBadLength, typ)
	}
	body, err := r.Next(n)
	if err != nil {
		return nil, unexpectedEOF(err)
	}
	switch {
	case typ == 'D':
		values, err := decodeDataRow(body)
		if err != nil {
			return nil, err
		}
		return &pgproto3.DataRow{Values: values}, nil
	case typ == 'R' && len(body) >= 4 && binary.BigEndian.Uint32(body) == pgproto3.AuthTypeSASL:
		// pgproto3/v2's decoder loops forever on a list without its NULs.
		mechs, err := decodeSASLMechanisms(body[4:])
		if err != nil {
			return nil, err
		}
		return &pgproto3.AuthenticationSASL{AuthMechanisms: mechs}, nil
	}
	return decodeOther(typ, body)
}

// decodeOther decodes the messages pgproto3 decodes safely, under a
// recover all the same. (Kept apart from receive so that no row or SASL
// message can reach pgproto3's decoders, in fact or in a call graph.)
func decodeOther(typ byte, body []byte) (msg pgproto3.BackendMessage, err error) {
	m, err := backendMessage(typ, body)
	if err != nil {
		return nil, err
	}
	defer func() {
		if recover() != nil {
			msg, err = nil, fmt.Errorf("malformed %q message", typ)
		}
	}()
	if err := m.Decode(body); err != nil {
		return nil, fmt.Errorf("malformed %q message: %w", typ, err)
	}
	return m, nil
}

// backendMessage is an empty message of the kind typ names.
func backendMessage(typ byte, body []byte) (pgproto3.BackendMessage, error) {
	switch typ {
	case '1':
		return &pgproto3.ParseComplete{}, nil
	case '2':
		return &pgproto3.BindComplete{}, nil
	case '3':
		return &pgproto3.CloseComplete{}, nil
	case 'A':
		return &pgproto3.NotificationResponse{}, nil
	case 'C':
		return &pgproto3.CommandComplete{}, nil
	case 'E':
		return &pgproto3.ErrorResponse{}, nil
	case 'I':
		return &pgproto3.EmptyQueryResponse{}, nil
	case 'K':
		return &pgproto3.BackendKeyData{}, nil
	case 'n':
		return &pgproto3.NoData{}, nil
	case 'N':
		return &pgproto3.NoticeResponse{}, nil
	case 's':
		return &pgproto3.PortalSuspended{}, nil
	case 'S':
		return &pgproto3.ParameterStatus{}, nil
	case 't':
		return &pgproto3.ParameterDescription{}, nil
	case 'T':
		return &pgproto3.RowDescription{}, nil
	case 'Z':
		return &pgproto3.ReadyForQuery{}, nil
	case 'R':
		if len(body) < 4 {
			return nil, errors.New("authentication message too short")
		}
		switch auth := binary.BigEndian.Uint32(body); auth {
		case pgproto3.AuthTypeOk:
			return &pgproto3.AuthenticationOk{}, nil
		case pgproto3.AuthTypeCleartextPassword:
			return &pgproto3.AuthenticationCleartextPassword{}, nil
		case pgproto3.AuthTypeMD5Password:
			return &pgproto3.AuthenticationMD5Password{}, nil
		case pgproto3.AuthTypeGSS:
			return &pgproto3.AuthenticationGSS{}, nil
		case pgproto3.AuthTypeGSSCont:
			return &pgproto3.AuthenticationGSSContinue{}, nil
		case pgproto3.AuthTypeSASLContinue:
			return &pgproto3.AuthenticationSASLContinue{}, nil
		case pgproto3.AuthTypeSASLFinal:
			return &pgproto3.AuthenticationSASLFinal{}, nil
		default:
			return nil, fmt.Errorf("unsupported authentication request %d", auth)
		}
	}
	return nil, fmt.Errorf("unexpected message type %q", typ)
}

// decodeDataRow decodes a DataRow body: a column count, then per column a
// length (-1 for NULL) and that many bytes. Lengths are checked against
// what is there; the values refer to body.
func decodeDataRow(body []byte) ([][]byte, error) {
	if len(body) < 2 {
		return nil, errors.New("malformed DataRow: too short")
	}
	n := int(binary.BigEndian.Uint16(body))
	rest := body[2:]
	// Each column takes at least its 4-byte length.
	if n > len(rest)/4 {
		return nil, fmt.Errorf("malformed DataRow: %d columns in %d bytes", n, len(rest))
	}
	values := make([][]byte, n)
	for i := range values {
		if len(rest) < 4 {
			return nil, errors.New("malformed DataRow: truncated")
		}
		l := int32(binary.BigEndian.Uint32(rest))
		rest = rest[4:]
		switch {
		case l == -1:
			continue // NULL
		case l < 0 || int(l) > len(rest):
			return nil, fmt.Errorf("malformed DataRow: column %d has length %d", i, l)
		}
		values[i] = rest[:l:l]
		rest = rest[l:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("malformed DataRow: %d trailing bytes", len(rest))
	}
	return values, nil
}

// decodeSASLMechanisms decodes AuthenticationSASL's list: names, each
// ending in a NUL, then an empty name.
func decodeSASLMechanisms(b []byte) ([]string, error) {
	var out []string
	for {
		i := bytes.IndexByte(b, 0)
		switch {
		case i < 0:
			return nil, errors.New("malformed AuthenticationSASL: unterminated mechanism list")
		case i == 0:
			if len(b) != 1 {
				return nil, errors.New("malformed AuthenticationSASL: trailing bytes")
			}
			return out, nil
		}
		out = append(out, string(b[:i]))
		b = b[i+1:]
	}
}

func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// backendConn is credproxy's side of a conversation with a backend:
// pgproto3 encodes what it sends, receive decodes what it reads.
type backendConn struct {
	fe *pgproto3.Frontend
	cr pgproto3.ChunkReader
}

func newBackendConn(cr pgproto3.ChunkReader, w io.Writer) *backendConn {
	return &backendConn{fe: pgproto3.NewFrontend(cr, w), cr: cr}
}

// Send writes one message.
func (b *backendConn) Send(msg pgproto3.FrontendMessage) error { return b.fe.Send(msg) }

// Receive reads one message (see receive).
func (b *backendConn) Receive() (pgproto3.BackendMessage, error) { return receive(b.cr) }
