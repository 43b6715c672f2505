package postgres

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/jackc/pgproto3/v2"
)

// Request codes that take the place of a protocol version in a startup packet.
const (
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
	cancelRequestCode = 80877102
	protocol30        = pgproto3.ProtocolVersionNumber
)

// maxStartupPacket is PostgreSQL's own MAX_STARTUP_PACKET_LENGTH.
const maxStartupPacket = 10000

// maxHandshakeMessage caps one upstream message during the handshake (auth
// exchanges, ParameterStatus, notices): all are small, and a larger one is a
// broken or hostile server.
const maxHandshakeMessage = 1 << 20

// SQLSTATEs credproxy itself reports.
const (
	codeProtocolViolation     = "08P01"
	codeFeatureNotSupported   = "0A000"
	codeConnectionFailure     = "08006"
	codeUnableToConnect       = "08001"
	codeInvalidAuthorization  = "28000"
	codeInvalidPassword       = "28P01"
	codeInsufficientPrivilege = "42501"
	codeAdminShutdown         = "57P01"
	codeTooManyConnections    = "53300"
	codeInternalError         = "XX000"
)

// errBadStartup marks a first packet that is not a PostgreSQL startup packet.
var errBadStartup = errors.New("invalid startup packet")

// startupPacket is a decoded first packet: a request code or a protocol version.
type startupPacket struct {
	code   uint32 // protocol version (major<<16|minor) or request code
	body   []byte // after the code
	params map[string]string
}

func (p *startupPacket) major() uint32 { return p.code >> 16 }
func (p *startupPacket) minor() uint32 { return p.code & 0xffff }

// readStartupPacket reads one untyped packet (length, code, body) and, for a
// protocol 3 StartupMessage, decodes its parameters with pgproto3.
//
// The length is read and checked on its own, as PostgreSQL's
// ProcessStartupPacket does, so a bad one is refused at once instead of
// after waiting for bytes a broken client will never send.
func readStartupPacket(r io.Reader) (*startupPacket, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 8 || n > maxStartupPacket {
		return nil, fmt.Errorf("%w: length %d", errBadStartup, n)
	}
	rest := make([]byte, n-4)
	if _, err := io.ReadFull(r, rest); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the length arrived: this is a truncated packet
		}
		return nil, err
	}
	p := &startupPacket{code: binary.BigEndian.Uint32(rest), body: rest[4:]}
	return p, decodeStartupPacket(p)
}

// decodeStartupPacket validates p and fills p.params for a StartupMessage.
func decodeStartupPacket(p *startupPacket) error {
	switch p.code {
	case sslRequestCode, gssEncRequestCode:
		if len(p.body) != 0 {
			return fmt.Errorf("%w: request with a body", errBadStartup)
		}
		return nil
	case cancelRequestCode:
		return nil // decoded where it is served
	}
	if p.major() != 3 {
		return nil // answered with "unsupported frontend protocol"
	}
	// pgproto3 accepts only 3.0; a 3.x client is decoded as 3.0 and told so
	// with NegotiateProtocolVersion.
	src := make([]byte, 4+len(p.body))
	binary.BigEndian.PutUint32(src, protocol30)
	copy(src[4:], p.body)
	var sm pgproto3.StartupMessage
	if err := sm.Decode(src); err != nil {
		return fmt.Errorf("%w: %v", errBadStartup, err)
	}
	p.params = sm.Parameters
	return nil
}

// decodeCancel decodes a CancelRequest body (after the code).
func decodeCancel(p *startupPacket) (*pgproto3.CancelRequest, error) {
	src := make([]byte, 4+len(p.body))
	binary.BigEndian.PutUint32(src, cancelRequestCode)
	copy(src[4:], p.body)
	var cr pgproto3.CancelRequest
	if err := cr.Decode(src); err != nil {
		return nil, fmt.Errorf("%w: %v", errBadStartup, err)
	}
	return &cr, nil
}

// splitProtocolOptions separates the "_pq_." protocol options, which this
// proxy does not implement, from ordinary startup parameters.
func splitProtocolOptions(params map[string]string) (rest map[string]string, unrecognized []string) {
	rest = make(map[string]string, len(params))
	for k, v := range params {
		if strings.HasPrefix(k, "_pq_.") {
			unrecognized = append(unrecognized, k)
			continue
		}
		rest[k] = v
	}
	return rest, unrecognized
}

// appendNegotiateProtocolVersion encodes NegotiateProtocolVersion ('v'),
// which pgproto3/v2 lacks: the newest protocol version supported, then the
// protocol options that were not recognized. The version is a full
// protocol number (major<<16 | minor), as PostgreSQL's server sends it
// (PG_PROTOCOL_LATEST, 196608 for 3.0) and as libpq 18 reads it, although
// the protocol docs speak of a "minor version".
func appendNegotiateProtocolVersion(dst []byte, version uint32, unrecognized []string) []byte {
	start := len(dst)
	dst = append(dst, 'v', 0, 0, 0, 0)
	dst = binary.BigEndian.AppendUint32(dst, version)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(unrecognized)))
	for _, o := range unrecognized {
		dst = append(dst, o...)
		dst = append(dst, 0)
	}
	binary.BigEndian.PutUint32(dst[start+1:], uint32(len(dst)-start-1))
	return dst
}

// fatal builds the ErrorResponse credproxy sends before closing a session.
func fatal(code, msg string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: code, Message: msg}
}

// cappedReader is a pgproto3.ChunkReader that reads exactly what is asked
// (never ahead of a message boundary, so the bytes after the handshake stay
// in the bufio.Reader for the relay) and refuses oversized messages.
type cappedReader struct {
	r   *bufio.Reader
	max int
}

// errTooLarge is returned for a message longer than the cap.
var errTooLarge = errors.New("message too large")

// Next implements pgproto3.ChunkReader.
func (c *cappedReader) Next(n int) ([]byte, error) {
	if n > c.max {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", errTooLarge, n, c.max)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(c.r, buf); err != nil {
		return nil, err
	}
	return buf, nil
}
