package httpproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/credproxy/credproxy/config"
)

// maxSignedBody caps how much of a request body aws_sigv4 buffers to hash.
// A larger body must come with its own X-Amz-Content-Sha256 (a hash, or
// UNSIGNED-PAYLOAD where the service accepts it).
const maxSignedBody = 16 << 20

// injector places a credential in an outgoing request. fields are the
// credential's revealed values; they exist only for the duration of the
// call. Inject runs after header hygiene, so what it sets is final.
type injector interface {
	Inject(ctx context.Context, req *http.Request, fields map[string]string) error
	// Kind is the inject key: header, basic, query or aws_sigv4.
	Kind() string
	// Placed returns the values Inject put in req (a header value, a
	// query parameter, a signature), for redaction.
	Placed(req *http.Request) []string
	// Uses names the credential fields Inject reads: the values an
	// upstream could send back (see echoScrubber).
	Uses() fieldUse
}

// fieldUse is the set of credential fields an injector reads; all means
// its templates could read any (they pass the whole map on).
type fieldUse struct {
	names []string
	all   bool
}

func (u fieldUse) Uses() fieldUse { return u }

// pick returns the fields in u, from fields.
func (u fieldUse) pick(fields map[string]string) map[string]string {
	if u.all {
		return fields
	}
	out := make(map[string]string, len(u.names))
	for _, n := range u.names {
		if v, ok := fields[n]; ok {
			out[n] = v
		}
	}
	return out
}

// templateFields is what the templates read of the field map: every
// .field they name. A template that uses the map otherwise (a bare dot,
// index, a nested template) may read any field.
func templateFields(ts ...*template.Template) fieldUse {
	var u fieldUse
	var walk func(n parse.Node)
	walkBranch := func(b *parse.BranchNode) {
		walk(b.Pipe)
		walk(b.List)
		walk(b.ElseList)
	}
	walk = func(n parse.Node) {
		switch n := n.(type) {
		case *parse.ListNode:
			if n != nil {
				for _, c := range n.Nodes {
					walk(c)
				}
			}
		case *parse.PipeNode:
			if n != nil {
				for _, d := range n.Decl {
					walk(d)
				}
				for _, c := range n.Cmds {
					walk(c)
				}
			}
		case *parse.ActionNode:
			walk(n.Pipe)
		case *parse.CommandNode:
			for _, a := range n.Args {
				walk(a)
			}
		case *parse.FieldNode:
			u.names = append(u.names, n.Ident[0])
		case *parse.VariableNode:
			if len(n.Ident) > 1 && n.Ident[0] == "$" {
				u.names = append(u.names, n.Ident[1])
			} else if len(n.Ident) == 1 && n.Ident[0] == "$" {
				u.all = true
			}
		case *parse.ChainNode:
			walk(n.Node)
		case *parse.IfNode:
			walkBranch(&n.BranchNode)
		case *parse.WithNode:
			walkBranch(&n.BranchNode)
		case *parse.RangeNode:
			walkBranch(&n.BranchNode)
		case *parse.TextNode, *parse.StringNode, *parse.NumberNode, *parse.BoolNode, *parse.NilNode,
			*parse.IdentifierNode, *parse.CommentNode, *parse.BreakNode, *parse.ContinueNode:
		case nil:
		default: // a bare dot, a nested template, anything new
			u.all = true
		}
	}
	for _, t := range ts {
		if t.Tree == nil {
			u.all = true
			continue
		}
		walk(t.Tree.Root)
	}
	return u
}

// injectError is a failure to inject: status and a message safe for the
// client (it never contains a field value).
type injectError struct {
	status int
	reason string // the audit reason
	msg    string
}

func (e *injectError) Error() string { return e.msg }

func credentialError(format string, args ...any) error {
	return &injectError{status: http.StatusServiceUnavailable, reason: "credential unavailable", msg: fmt.Sprintf(format, args...)}
}

// newInjector parses a route's templates; missingkey=error makes a field
// the credential lacks an error at injection time instead of "<no value>".
func newInjector(in config.Inject) (injector, error) {
	switch {
	case in.Header != nil:
		name := textproto.CanonicalMIMEHeaderKey(in.Header.Name)
		if !validHeaderName(in.Header.Name) {
			return nil, fmt.Errorf("header: %q is not a valid header name", in.Header.Name)
		}
		if isHopByHop(name) {
			return nil, fmt.Errorf("header: %q is a hop-by-hop header and would not reach the upstream", in.Header.Name)
		}
		t, err := parseTemplate("header.value", in.Header.Value)
		if err != nil {
			return nil, err
		}
		return &headerInjector{name: name, value: t, fieldUse: templateFields(t)}, nil
	case in.Basic != nil:
		u, err := parseTemplate("basic.username", in.Basic.Username)
		if err != nil {
			return nil, err
		}
		p, err := parseTemplate("basic.password", in.Basic.Password)
		if err != nil {
			return nil, err
		}
		return &basicInjector{user: u, password: p, fieldUse: templateFields(u, p)}, nil
	case in.Query != nil:
		if in.Query.Name == "" {
			return nil, errors.New("query: name is empty")
		}
		t, err := parseTemplate("query.value", in.Query.Value)
		if err != nil {
			return nil, err
		}
		return &queryInjector{name: in.Query.Name, value: t, fieldUse: templateFields(t)}, nil
	case in.AWSSigV4 != nil:
		if in.AWSSigV4.Service == "" || in.AWSSigV4.Region == "" {
			return nil, errors.New("aws_sigv4: service and region are required")
		}
		return &sigv4Injector{service: in.AWSSigV4.Service, region: in.AWSSigV4.Region, signer: v4.NewSigner(),
			fieldUse: fieldUse{names: []string{"access_key", "secret_key", "session_token"}}}, nil
	}
	return nil, errors.New("set one of header, basic, query, aws_sigv4")
}

func parseTemplate(name, text string) (*template.Template, error) {
	t, err := template.New(name).Option("missingkey=error").Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%s: invalid template: %w", name, err)
	}
	return t, nil
}

// render executes t over the fields. Its error names the template and the
// missing field, never a value (see scrubber for the belt and braces).
func render(t *template.Template, fields map[string]string) (string, error) {
	var b strings.Builder
	if err := t.Execute(&b, fields); err != nil {
		return "", err
	}
	return b.String(), nil
}

// fixedInjector is an injector whose change to a request depends on the
// credential alone, not on the request: header, basic and query. Its
// Inject is fixed, then set; route.prepare calls fixed once per
// credential and applies set to each request.
type fixedInjector interface {
	injector
	// fixed renders the credential's value and returns what places it in
	// a request; its error is Inject's.
	fixed(fields map[string]string) (set func(*http.Request), err error)
}

var (
	_ fixedInjector = (*headerInjector)(nil)
	_ fixedInjector = (*basicInjector)(nil)
	_ fixedInjector = (*queryInjector)(nil)
)

// injectFixed is Inject for a fixedInjector.
func injectFixed(f fixedInjector, req *http.Request, fields map[string]string) error {
	set, err := f.fixed(fields)
	if err != nil {
		return err
	}
	set(req)
	return nil
}

// headerInjector sets one header, replacing whatever the app sent under
// that name.
type headerInjector struct {
	name  string // canonical
	value *template.Template
	fieldUse
}

func (h *headerInjector) Kind() string { return "header" }

func (h *headerInjector) Placed(req *http.Request) []string { return req.Header[h.name] }

func (h *headerInjector) Inject(_ context.Context, req *http.Request, fields map[string]string) error {
	return injectFixed(h, req, fields)
}

func (h *headerInjector) fixed(fields map[string]string) (func(*http.Request), error) {
	v, err := render(h.value, fields)
	if err != nil {
		return nil, credentialError("cannot render %s: %v", h.value.Name(), err)
	}
	if !validHeaderValue(v) {
		return nil, credentialError("%s rendered a value that is not a valid header value (control characters)", h.value.Name())
	}
	return func(req *http.Request) {
		deleteHeaderFold(req.Header, h.name)
		req.Header[h.name] = []string{v}
	}, nil
}

// basicInjector sets Authorization: Basic.
type basicInjector struct {
	user, password *template.Template
	fieldUse
}

func (b *basicInjector) Kind() string { return "basic" }

func (b *basicInjector) Placed(req *http.Request) []string { return authorizationForms(req) }

// authorizationForms is the Authorization value and its credential part.
func authorizationForms(req *http.Request) []string {
	v := req.Header.Get("Authorization")
	out := []string{v}
	if _, cred, ok := strings.Cut(v, " "); ok {
		out = append(out, cred)
	}
	return out
}

func (b *basicInjector) Inject(_ context.Context, req *http.Request, fields map[string]string) error {
	return injectFixed(b, req, fields)
}

func (b *basicInjector) fixed(fields map[string]string) (func(*http.Request), error) {
	u, err := render(b.user, fields)
	if err != nil {
		return nil, credentialError("cannot render %s: %v", b.user.Name(), err)
	}
	p, err := render(b.password, fields)
	if err != nil {
		return nil, credentialError("cannot render %s: %v", b.password.Name(), err)
	}
	if strings.Contains(u, ":") {
		return nil, credentialError("basic.username rendered a value containing ':', which basic auth cannot carry")
	}
	v := "Basic " + base64.StdEncoding.EncodeToString([]byte(u+":"+p))
	return func(req *http.Request) {
		deleteHeaderFold(req.Header, "Authorization")
		req.Header["Authorization"] = []string{v}
	}, nil
}

// queryInjector sets one query parameter, replacing every occurrence the
// app sent; the rest of the query string is left byte for byte.
type queryInjector struct {
	name  string
	value *template.Template
	fieldUse
}

func (q *queryInjector) Kind() string { return "query" }

func (q *queryInjector) Placed(req *http.Request) []string {
	_, v, _ := strings.Cut(req.URL.RawQuery[strings.LastIndexByte(req.URL.RawQuery, '&')+1:], "=")
	return []string{v}
}

func (q *queryInjector) Inject(_ context.Context, req *http.Request, fields map[string]string) error {
	return injectFixed(q, req, fields)
}

func (q *queryInjector) fixed(fields map[string]string) (func(*http.Request), error) {
	v, err := render(q.value, fields)
	if err != nil {
		return nil, credentialError("cannot render %s: %v", q.value.Name(), err)
	}
	return func(req *http.Request) {
		req.URL.RawQuery = setQueryParam(req.URL.RawQuery, q.name, v)
		req.URL.ForceQuery = false
	}, nil
}

// setQueryParam drops every parameter named name from rawQuery (in any
// percent-encoding, and also where a ';' separates parameters, as some
// servers split on it) and appends name=value.
func setQueryParam(rawQuery, name, value string) string {
	var parts []string
	for _, p := range strings.Split(rawQuery, "&") {
		if p == "" || queryPieceNames(p, name) {
			continue
		}
		parts = append(parts, p)
	}
	parts = append(parts, url.QueryEscape(name)+"="+url.QueryEscape(value))
	return strings.Join(parts, "&")
}

// queryPieceNames reports whether a '&'-separated piece sets name.
func queryPieceNames(piece, name string) bool {
	for _, sub := range strings.Split(piece, ";") {
		key, _, _ := strings.Cut(sub, "=")
		if key == name {
			return true
		}
		if k, err := url.QueryUnescape(key); err == nil && k == name {
			return true
		}
		if k, err := url.PathUnescape(key); err == nil && k == name {
			return true
		}
	}
	return false
}

// sigv4Injector signs the request with the AWS SDK's SigV4 signer,
// replacing any signature the app made (with dummy keys, or none).
type sigv4Injector struct {
	service, region string
	signer          *v4.Signer
	fieldUse
}

func (s *sigv4Injector) Kind() string { return "aws_sigv4" }

func (s *sigv4Injector) Placed(req *http.Request) []string {
	return append(authorizationForms(req), req.Header.Get("X-Amz-Security-Token"))
}

// emptySHA256 is the payload hash of an empty body.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// amzQueryAuth are the query parameters of a presigned URL; a request
// carrying the app's own presigned signature is re-signed in headers.
var amzQueryAuth = []string{"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
	"X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"}

func (s *sigv4Injector) Inject(ctx context.Context, req *http.Request, fields map[string]string) error {
	ak, okA := fields["access_key"]
	sk, okS := fields["secret_key"]
	if !okA || !okS {
		return credentialError("aws_sigv4 needs fields access_key and secret_key")
	}
	for _, h := range []string{"Authorization", "X-Amz-Date", "X-Amz-Security-Token"} {
		deleteHeaderFold(req.Header, h)
	}
	if req.URL.RawQuery != "" && strings.Contains(req.URL.RawQuery, "X-Amz-") {
		for _, k := range amzQueryAuth {
			req.URL.RawQuery = dropQueryParam(req.URL.RawQuery, k)
		}
	}

	hash, err := payloadHash(req)
	if err != nil {
		return err
	}
	if s.service == "s3" {
		req.Header.Set("X-Amz-Content-Sha256", hash)
	}
	creds := aws.Credentials{AccessKeyID: ak, SecretAccessKey: sk, SessionToken: fields["session_token"], Source: "credproxy"}
	err = s.signer.SignHTTP(ctx, creds, req, hash, s.service, s.region, time.Now(), func(o *v4.SignerOptions) {
		// S3 signs the path as sent; every other service escapes it again.
		o.DisableURIPathEscaping = s.service == "s3"
	})
	if err != nil {
		return credentialError("aws_sigv4: signing failed: %v", err)
	}
	return nil
}

// payloadHash is the hex SHA-256 the signature covers: the app's own
// X-Amz-Content-Sha256 when it is a hash or UNSIGNED-PAYLOAD, else the hash
// of the body, which is buffered (up to maxSignedBody) to compute it.
func payloadHash(req *http.Request) (string, error) {
	h := strings.TrimSpace(req.Header.Get("X-Amz-Content-Sha256"))
	switch {
	case h == "UNSIGNED-PAYLOAD" || isHexSHA256(h):
		return h, nil
	case strings.HasPrefix(h, "STREAMING-"):
		return "", &injectError{status: http.StatusBadRequest, reason: "unsupported request",
			msg: "aws_sigv4: streaming (aws-chunked) payload signatures cannot be re-signed; configure the client to sign whole payloads or use UNSIGNED-PAYLOAD"}
	}
	if req.Body == nil || req.Body == http.NoBody || req.ContentLength == 0 {
		return emptySHA256, nil
	}
	body, err := io.ReadAll(io.LimitReader(req.Body, maxSignedBody+1))
	_ = req.Body.Close()
	if err != nil {
		return "", &injectError{status: http.StatusBadRequest, reason: "bad request", msg: fmt.Sprintf("aws_sigv4: reading the request body: %v", err)}
	}
	if len(body) > maxSignedBody {
		return "", &injectError{status: http.StatusRequestEntityTooLarge, reason: "bad request",
			msg: fmt.Sprintf("aws_sigv4: bodies over %d MiB are not buffered for signing; send X-Amz-Content-Sha256", maxSignedBody>>20)}
	}
	sum := sha256.Sum256(body)
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	req.ContentLength = int64(len(body))
	req.TransferEncoding = nil
	return hex.EncodeToString(sum[:]), nil
}

func isHexSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// dropQueryParam removes every parameter named name.
func dropQueryParam(rawQuery, name string) string {
	var parts []string
	for _, p := range strings.Split(rawQuery, "&") {
		if p != "" && !queryPieceNames(p, name) {
			parts = append(parts, p)
		}
	}
	return strings.Join(parts, "&")
}

// ---- header hygiene ----

// hopByHop are the connection-level headers of RFC 9110 section 7.6.1,
// plus the Proxy-* family; none of them travels past credproxy.
var hopByHop = map[string]bool{
	"Connection":          true,
	"Proxy-Connection":    true,
	"Keep-Alive":          true,
	"Proxy-Authenticate":  true,
	"Proxy-Authorization": true,
	"Te":                  true,
	"Trailer":             true,
	"Transfer-Encoding":   true,
	"Upgrade":             true,
	"Http2-Settings":      true,
}

func isHopByHop(canonical string) bool {
	return hopByHop[canonical] || strings.HasPrefix(canonical, "Proxy-")
}

// isWebSocket reports whether h asks for (or, on a 101, grants) a
// WebSocket upgrade: the one upgrade credproxy relays.
func isWebSocket(h http.Header) bool {
	return headerHasToken(h, "Connection", "upgrade") && headerHasToken(h, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, name, token string) bool {
	for k, vs := range h {
		if !strings.EqualFold(k, name) {
			continue
		}
		for _, v := range vs {
			for t := range strings.SplitSeq(v, ",") {
				if strings.EqualFold(strings.TrimSpace(t), token) {
					return true
				}
			}
		}
	}
	return false
}

// sanitizeHeaders removes hop-by-hop headers, every Proxy-* header and
// every header the Connection header names. keepWebSocket keeps a
// WebSocket upgrade (Connection: Upgrade, Upgrade: websocket) and drops any
// other upgrade, h2c included. Run on the app's headers before injection,
// so a Connection header that names the injected header only removes the
// app's copy of it.
func sanitizeHeaders(h http.Header, keepWebSocket bool) {
	ws := keepWebSocket && isWebSocket(h)
	named := connectionNamed(h)
	for k := range h {
		if dropHeader(k, &named) {
			delete(h, k)
		}
	}
	if ws {
		h["Connection"] = []string{"Upgrade"}
		h["Upgrade"] = []string{"websocket"}
	}
}

// sanitizedCopy is sanitizeHeaders on a new map with h's entries: h is
// left as it is, and the copy shares its value slices.
func sanitizedCopy(h http.Header, keepWebSocket bool) http.Header {
	ws := keepWebSocket && isWebSocket(h)
	named := connectionNamed(h)
	out := make(http.Header, len(h))
	for k, vs := range h {
		if !dropHeader(k, &named) {
			out[k] = vs
		}
	}
	if ws {
		out["Connection"] = []string{"Upgrade"}
		out["Upgrade"] = []string{"websocket"}
	}
	return out
}

// namedHeaders are the headers a Connection header names, canonical: a
// few in a slice (the usual case, no map to make), more in a map (the app
// picks how many; a lookup must not cost as many comparisons).
type namedHeaders struct {
	few  []string
	many map[string]bool
}

const maxFewNamed = 8

func (n *namedHeaders) add(name string) {
	if n.many != nil {
		n.many[name] = true
		return
	}
	n.few = append(n.few, name)
	if len(n.few) > maxFewNamed {
		n.many = make(map[string]bool, 2*len(n.few))
		for _, f := range n.few {
			n.many[f] = true
		}
		n.few = nil
	}
}

func (n *namedHeaders) has(name string) bool {
	if n.many != nil {
		return n.many[name]
	}
	return slices.Contains(n.few, name)
}

// connectionNamed lists the headers the Connection header names.
func connectionNamed(h http.Header) namedHeaders {
	var named namedHeaders
	for k, vs := range h {
		if !strings.EqualFold(k, "Connection") {
			continue
		}
		for _, v := range vs {
			for t := range strings.SplitSeq(v, ",") {
				if t = strings.TrimSpace(t); t != "" {
					named.add(textproto.CanonicalMIMEHeaderKey(t))
				}
			}
		}
	}
	return named
}

// dropHeader reports whether header k goes: hop-by-hop, Proxy-*, or
// named by Connection.
func dropHeader(k string, named *namedHeaders) bool {
	ck := textproto.CanonicalMIMEHeaderKey(k)
	return isHopByHop(ck) || named.has(ck)
}

// deleteHeaderFold deletes name in any letter case, including keys that
// were not canonicalized.
func deleteHeaderFold(h http.Header, name string) {
	for k := range h {
		if strings.EqualFold(k, name) {
			delete(h, k)
		}
	}
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// validHeaderValue rejects CR, LF, NUL and other control bytes (tab is
// allowed): a rendered value must not be able to add headers.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// ---- redaction ----

// scrubber replaces every form of a credential's values that could show up
// in an error (the value, its base64, its URL encodings) with REDACTED.
// Messages should not contain them in the first place; this is the belt
// to that pair of braces.
type scrubber struct {
	forms []string
}

// minScrubLen: shorter values would redact ordinary words.
const minScrubLen = 4

func newScrubber(fields map[string]string) *scrubber {
	s := &scrubber{}
	add := func(v string) {
		if len(v) >= minScrubLen {
			s.forms = append(s.forms, v)
		}
	}
	for _, v := range fields {
		add(v)
		add(base64.StdEncoding.EncodeToString([]byte(v)))
		add(base64.RawStdEncoding.EncodeToString([]byte(v)))
		add(base64.URLEncoding.EncodeToString([]byte(v)))
		add(base64.RawURLEncoding.EncodeToString([]byte(v)))
		add(url.QueryEscape(v))
		add(url.PathEscape(v))
	}
	if u, ok := fields["username"]; ok {
		add(base64.StdEncoding.EncodeToString([]byte(u + ":" + fields["password"])))
	}
	return s
}

// add registers more values (what an injector placed).
func (s *scrubber) add(vs ...string) {
	for _, v := range vs {
		if len(v) >= minScrubLen {
			s.forms = append(s.forms, v)
		}
		if u, err := url.QueryUnescape(v); err == nil && u != v && len(u) >= minScrubLen {
			s.forms = append(s.forms, u)
		}
	}
}

func (s *scrubber) scrub(msg string) string {
	if s == nil {
		return msg
	}
	// Longest first: a form that contains another goes whole.
	slices.SortFunc(s.forms, func(a, b string) int { return len(b) - len(a) })
	for _, f := range s.forms {
		if strings.Contains(msg, f) {
			msg = strings.ReplaceAll(msg, f, "REDACTED")
		}
	}
	return msg
}
