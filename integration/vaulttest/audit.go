package vaulttest

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"
)

// auditDevice is a file audit device (Vault's audit/backend_file.go with
// the JSON format).
type auditDevice struct {
	path         string // "file/"
	typ          string
	description  string
	options      map[string]string
	local        bool
	salt         []byte
	logRaw       bool
	hmacAccessor bool

	mu sync.Mutex
	w  io.Writer
	f  *os.File // nil for stdout and discard
}

func (d *auditDevice) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f != nil {
		d.f.Close()
		d.f = nil
		d.w = io.Discard
	}
}

// hash is salt.GetIdentifiedHMAC: "hmac-sha256:" and the hex HMAC-SHA256
// of in under the device's salt.
func (d *auditDevice) hash(in string) string {
	mac := hmac.New(sha256.New, d.salt)
	mac.Write([]byte(in))
	return "hmac-sha256:" + hex.EncodeToString(mac.Sum(nil))
}

func (d *auditDevice) hashString(in string) string {
	if d.logRaw || in == "" {
		return in
	}
	return d.hash(in)
}

// hashData copies data with every string value HMAC'd (HashStructure):
// keys are kept, numbers and booleans too, times become RFC 3339 strings
// before hashing.
func (d *auditDevice) hashData(data map[string]any) map[string]any {
	if data == nil {
		return nil
	}
	b, err := json.Marshal(data)
	if err != nil {
		return map[string]any{"error": "vaulttest: unencodable data"}
	}
	var out map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&out); err != nil {
		return nil
	}
	if d.logRaw {
		return out
	}
	return d.hashValue(out).(map[string]any)
}

func (d *auditDevice) hashValue(v any) any {
	switch x := v.(type) {
	case string:
		return d.hash(x)
	case map[string]any:
		for k, e := range x {
			x[k] = d.hashValue(e)
		}
		return x
	case []any:
		for i, e := range x {
			x[i] = d.hashValue(e)
		}
		return x
	}
	return v
}

func (d *auditDevice) write(entry any) error {
	b, err := json.Marshal(entry)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	d.mu.Lock()
	defer d.mu.Unlock()
	_, err = d.w.Write(b)
	return err
}

// The audit entry shapes, after Vault's audit/types.go.
type auditEntry struct {
	Time     string         `json:"time,omitempty"`
	Type     string         `json:"type,omitempty"`
	Auth     *auditAuth     `json:"auth,omitempty"`
	Request  *auditRequest  `json:"request,omitempty"`
	Response *auditResponse `json:"response,omitempty"`
	Error    string         `json:"error,omitempty"`
}

type auditAuth struct {
	ClientToken    string              `json:"client_token,omitempty"`
	Accessor       string              `json:"accessor,omitempty"`
	DisplayName    string              `json:"display_name,omitempty"`
	Policies       []string            `json:"policies,omitempty"`
	TokenPolicies  []string            `json:"token_policies,omitempty"`
	PolicyResults  *auditPolicyResults `json:"policy_results,omitempty"`
	Metadata       map[string]string   `json:"metadata,omitempty"`
	NumUses        int                 `json:"num_uses,omitempty"`
	RemainingUses  int                 `json:"remaining_uses,omitempty"`
	TokenType      string              `json:"token_type,omitempty"`
	TokenTTL       int64               `json:"token_ttl,omitempty"`
	TokenIssueTime string              `json:"token_issue_time,omitempty"`
}

type auditPolicyResults struct {
	Allowed          bool              `json:"allowed"`
	GrantingPolicies []auditPolicyInfo `json:"granting_policies,omitempty"`
}

type auditPolicyInfo struct {
	Name        string `json:"name,omitempty"`
	NamespaceID string `json:"namespace_id,omitempty"`
	Type        string `json:"type"`
}

type auditNamespace struct {
	ID string `json:"id,omitempty"`
}

type auditRequest struct {
	ID                  string          `json:"id,omitempty"`
	ClientToken         string          `json:"client_token,omitempty"`
	ClientTokenAccessor string          `json:"client_token_accessor,omitempty"`
	Data                map[string]any  `json:"data,omitempty"`
	MountAccessor       string          `json:"mount_accessor,omitempty"`
	MountClass          string          `json:"mount_class,omitempty"`
	MountPoint          string          `json:"mount_point,omitempty"`
	MountType           string          `json:"mount_type,omitempty"`
	Namespace           *auditNamespace `json:"namespace,omitempty"`
	Operation           string          `json:"operation,omitempty"`
	Path                string          `json:"path,omitempty"`
	RemoteAddr          string          `json:"remote_address,omitempty"`
	RemotePort          int             `json:"remote_port,omitempty"`
}

type auditSecret struct {
	LeaseID string `json:"lease_id,omitempty"`
}

type auditResponse struct {
	Auth          *auditAuth     `json:"auth,omitempty"`
	Data          map[string]any `json:"data,omitempty"`
	MountAccessor string         `json:"mount_accessor,omitempty"`
	MountClass    string         `json:"mount_class,omitempty"`
	MountPoint    string         `json:"mount_point,omitempty"`
	MountType     string         `json:"mount_type,omitempty"`
	Secret        *auditSecret   `json:"secret,omitempty"`
	Warnings      []string       `json:"warnings,omitempty"`
}

// tokenView is a consistent copy of what the audit log shows of a token.
type tokenView struct {
	id, accessor, displayName string
	policies                  []string
	meta                      map[string]string
	numUses                   int
	ttl                       time.Duration
	issue                     time.Time
}

func (s *Server) viewToken(t *token) *tokenView {
	if t == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &tokenView{id: t.id, accessor: t.accessor, displayName: t.displayName, policies: t.policies,
		meta: t.meta, numUses: t.numUses, ttl: t.creationTTL, issue: t.creationTime}
}

func (s *Server) devices() []*auditDevice {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.audits) == 0 {
		return nil
	}
	out := make([]*auditDevice, 0, len(s.audits))
	for _, d := range s.audits {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].path < out[j].path })
	return out
}

// grantingPolicies lists the token's policies that alone allow the
// request, as the audit log's policy_results.
func (s *Server) grantingPolicies(req *request, tv *tokenView) []auditPolicyInfo {
	var out []auditPolicyInfo
	for _, name := range tv.policies {
		var p *policy
		if name == "root" {
			p = &policy{name: "root"}
		} else {
			s.mu.Lock()
			p = s.policies[name]
			s.mu.Unlock()
		}
		if p != nil && newACL([]*policy{p}).allows(req.path, req.op, false) {
			out = append(out, auditPolicyInfo{Name: name, NamespaceID: "root", Type: "acl"})
		}
	}
	return out
}

func (d *auditDevice) auth(tv *tokenView, results *auditPolicyResults) *auditAuth {
	a := &auditAuth{PolicyResults: results, TokenType: "default"}
	if tv == nil {
		return a
	}
	a.ClientToken = d.hashString(tv.id)
	a.Accessor = tv.accessor
	if d.hmacAccessor {
		a.Accessor = d.hashString(tv.accessor)
	}
	a.DisplayName = tv.displayName
	a.Policies = tv.policies
	a.TokenPolicies = tv.policies
	a.Metadata = tv.meta
	a.RemainingUses = tv.numUses
	a.TokenType = "service"
	a.TokenTTL = seconds(tv.ttl)
	a.TokenIssueTime = tv.issue.UTC().Format(time.RFC3339)
	return a
}

func (d *auditDevice) request(req *request, tv *tokenView) *auditRequest {
	ar := &auditRequest{
		ID:         req.id,
		Data:       d.hashData(req.data),
		Namespace:  &auditNamespace{ID: "root"},
		Operation:  string(req.op),
		Path:       req.path,
		RemoteAddr: req.remoteAddr,
		RemotePort: req.remotePort,
	}
	if len(ar.Data) == 0 {
		ar.Data = nil
	}
	if req.client != "" {
		ar.ClientToken = d.hashString(req.client)
	}
	if tv != nil {
		ar.ClientTokenAccessor = tv.accessor
		if d.hmacAccessor {
			ar.ClientTokenAccessor = d.hashString(tv.accessor)
		}
	}
	if m := req.mount; m != nil {
		ar.MountPoint, ar.MountType, ar.MountAccessor, ar.MountClass = m.path, m.typ, m.accessor, m.class()
	}
	return ar
}

// auditRequest logs the request entry, with the ACL's verdict and the
// error that ended the request before the backend, if any.
func (s *Server) auditRequest(req *request, a *acl, outerErr error) {
	devs := s.devices()
	if len(devs) == 0 {
		return
	}
	tv := s.viewToken(req.token)
	var results *auditPolicyResults
	if a != nil {
		results = &auditPolicyResults{Allowed: outerErr == nil}
		if outerErr == nil && tv != nil {
			results.GrantingPolicies = s.grantingPolicies(req, tv)
		}
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	for _, d := range devs {
		e := auditEntry{Time: now, Type: "request", Auth: d.auth(tv, results), Request: d.request(req, tv)}
		if outerErr != nil {
			_, e.Error = errorStatus(outerErr)
		}
		if err := d.write(e); err != nil {
			s.logf("vaulttest: audit %s: %v", d.path, err)
		}
	}
}

// auditResponse logs the response entry.
func (s *Server) auditResponse(req *request, resp *response, respErr error) {
	devs := s.devices()
	if len(devs) == 0 {
		return
	}
	tv := s.viewToken(req.token)
	var loginTV *tokenView
	if resp != nil && resp.auth != nil {
		if id, _ := resp.auth["client_token"].(string); id != "" {
			s.mu.Lock()
			t := s.tokens[id]
			s.mu.Unlock()
			loginTV = s.viewToken(t)
		}
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	for _, d := range devs {
		e := auditEntry{Time: now, Type: "response", Auth: d.auth(tv, nil), Request: d.request(req, tv)}
		if respErr != nil {
			_, e.Error = errorStatus(respErr)
		}
		if resp != nil {
			ar := &auditResponse{Data: d.hashData(resp.data), Warnings: resp.warnings}
			if m := req.mount; m != nil {
				ar.MountPoint, ar.MountType, ar.MountAccessor, ar.MountClass = m.path, m.typ, m.accessor, m.class()
			}
			if resp.leaseID != "" {
				ar.Secret = &auditSecret{LeaseID: resp.leaseID}
			}
			if loginTV != nil {
				ar.Auth = d.auth(loginTV, nil)
			}
			e.Response = ar
		}
		if err := d.write(e); err != nil {
			s.logf("vaulttest: audit %s: %v", d.path, err)
		}
	}
}

func (b *sysBackend) listAudit(r *request) (*response, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	data := map[string]any{}
	for p, d := range s.audits {
		data[p] = map[string]any{
			"type":        d.typ,
			"description": d.description,
			"options":     d.options,
			"path":        p,
			"local":       d.local,
		}
	}
	return &response{data: data}, nil
}

// enableAudit enables a file audit device (handleEnableAudit).
func (b *sysBackend) enableAudit(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	typ, err := r.data.str("type")
	if err != nil {
		return nil, err
	}
	desc, _ := r.data.str("description")
	local, _ := r.data.boolean("local", false)
	options, err := r.data.stringMap("options")
	if err != nil {
		return nil, err
	}
	if typ != "file" {
		return nil, badRequest("unknown backend type: %q", typ)
	}
	filePath := options["file_path"]
	if filePath == "" {
		filePath = options["path"]
	}
	if filePath == "" {
		return nil, badRequest("file_path is required")
	}
	d := &auditDevice{path: p, typ: typ, description: desc, options: options, local: local,
		salt: make([]byte, 32), hmacAccessor: true}
	rand.Read(d.salt)
	if v, ok := options["log_raw"]; ok {
		if d.logRaw, err = strconv.ParseBool(v); err != nil {
			return nil, badRequest("unable to parse 'log_raw': %s", err)
		}
	}
	if v, ok := options["hmac_accessor"]; ok {
		if d.hmacAccessor, err = strconv.ParseBool(v); err != nil {
			return nil, badRequest("unable to parse 'hmac_accessor': %s", err)
		}
	}

	s.mu.Lock()
	_, exists := s.audits[p]
	s.mu.Unlock()
	if exists {
		return nil, badRequest("path already in use")
	}
	switch filePath {
	case "discard":
		d.w = io.Discard
	case "stdout":
		d.w = os.Stdout
	default:
		f, err := os.OpenFile(filePath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, badRequest("sys: audit backend setup failed: %s", fmt.Errorf("error opening file %q: %w", filePath, err))
		}
		d.f, d.w = f, f
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, exists := s.audits[p]; exists {
		d.close()
		return nil, badRequest("path already in use")
	}
	s.audits[p] = d
	return nil, nil
}

func (b *sysBackend) disableAudit(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	s.mu.Lock()
	d := s.audits[p]
	delete(s.audits, p)
	s.mu.Unlock()
	if d != nil {
		d.close()
	}
	return nil, nil
}

// auditHash is sys/audit-hash/<path>: the HMAC a device writes for input.
func (b *sysBackend) auditHash(r *request) (*response, error) {
	s := b.s
	p := sanitizeMountPath(r.vars["path"])
	input, err := r.data.str("input")
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	d := s.audits[p]
	s.mu.Unlock()
	if d == nil {
		return nil, badRequest("unknown audit backend %s", p)
	}
	return &response{data: map[string]any{"hash": d.hash(input)}}, nil
}
