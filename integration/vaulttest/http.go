package vaulttest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// request is one logical request, as Vault's logical.Request.
type request struct {
	ctx        context.Context
	id         string
	op         op
	path       string // logical path: the URL path without /v1/
	data       fields
	mount      *mount
	vars       map[string]string // named groups of the route's pattern
	token      *token            // the authenticated token; nil on unauthenticated paths
	client     string            // the token as sent
	remoteAddr string
	remotePort int
	srv        *Server
}

// response is a handler's result, as Vault's logical.Response.
type response struct {
	status   int // overrides 200 (e.g. KV v2's 404 with metadata)
	data     map[string]any
	warnings []string
	// secret, when set by a handler, is registered as a lease.
	secret *secretSpec
	// login, when set by a handler, becomes a new token.
	login *loginSpec
	// Filled in when a lease or token has been made.
	leaseID       string
	leaseDuration int
	renewable     bool
	auth          map[string]any
	// raw bypasses the envelope (sys/health).
	raw any
	// noMountType leaves mount_type empty, as in bodies Vault backends
	// render themselves (logical.RespondWithStatusCode).
	noMountType bool
	// empty answers status with no body (202 Accepted).
	empty bool
}

func (r *response) addWarning(format string, args ...any) {
	r.warnings = append(r.warnings, fmt.Sprintf(format, args...))
}

// secretSpec is a leased secret a backend returns (logical.Secret).
type secretSpec struct {
	ttl, maxTTL time.Duration
	renewable   bool
	internal    map[string]any
	leaser      leaser
	// noLease reports the TTL without registering a lease, as Vault does
	// for KV.
	noLease bool
}

// loginSpec is an auth method's successful login (logical.Auth).
type loginSpec struct {
	policies        []string
	noDefaultPolicy bool
	metadata        map[string]string
	displayName     string
	ttl, maxTTL     time.Duration
	explicitMaxTTL  time.Duration
	period          time.Duration
	numUses         int
	internal        map[string]any
}

// sysInjected are the routes whose data Vault also copies into the top
// level of the response (http.injectDataIntoTopRoutes).
var sysInjected = []string{"sys/audit", "sys/audit/", "sys/audit-hash/", "sys/auth", "sys/auth/",
	"sys/capabilities", "sys/capabilities-accessor", "sys/capabilities-self", "sys/mounts", "sys/mounts/",
	"sys/policy", "sys/policy/", "sys/remount"}

func injectsData(path string) bool {
	for _, p := range sysInjected {
		if strings.HasSuffix(p, "/") && strings.HasPrefix(path, p) || path == p {
			return true
		}
	}
	return false
}

// serveHTTP is the /v1/ API, as Vault's handleLogical.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.gate.Lock()
	if !s.accepting {
		s.gate.Unlock()
		panic(http.ErrAbortHandler) // stopping: drop the connection, as a dead Vault would
	}
	s.handling.Add(1)
	s.gate.Unlock()
	defer s.handling.Done()
	w.Header().Set("Cache-Control", "no-store")

	path, ok := strings.CutPrefix(r.URL.Path, "/v1/")
	if !ok || path == "" {
		respondError(w, http.StatusNotFound, "")
		return
	}
	s.mu.Lock()
	s.counts[path]++
	s.mu.Unlock()

	switch path {
	case "sys/health":
		s.handleHealth(w, r)
		return
	case "sys/seal-status":
		s.handleSealStatus(w, r)
		return
	}
	if r.Header.Get("X-Vault-Wrap-TTL") != "" {
		// Fail loudly rather than answer unwrapped where Vault would wrap.
		respondError(w, http.StatusBadRequest, "vaulttest: response wrapping is not supported")
		return
	}

	req, status, err := s.buildRequest(r, path)
	if status != 0 {
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		respondError(w, status, msg)
		return
	}
	resp, err := s.handle(req)
	s.respond(w, req, resp, err)
}

// buildRequest is Vault's buildLogicalRequest: the operation from the
// method, data from the JSON body or, for reads, the query.
func (s *Server) buildRequest(r *http.Request, path string) (*request, int, error) {
	req := &request{ctx: r.Context(), id: newUUID(), path: path, srv: s, data: fields{}}
	if host, port, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		req.remoteAddr = host
		req.remotePort, _ = strconv.Atoi(port)
	}
	req.client = r.Header.Get("X-Vault-Token")
	if req.client == "" {
		if auth := r.Header.Get("Authorization"); strings.HasPrefix(auth, "Bearer ") {
			req.client = strings.TrimPrefix(auth, "Bearer ")
		}
	}

	switch r.Method {
	case http.MethodGet:
		req.op = opRead
		q := r.URL.Query()
		if l := q.Get("list"); l != "" {
			list, err := strconv.ParseBool(l)
			if err != nil {
				return nil, http.StatusBadRequest, nil
			}
			if list {
				req.op = opList
			}
		}
		for k, vs := range q {
			if k == "list" {
				continue
			}
			if len(vs) == 1 {
				req.data[k] = vs[0]
			} else {
				l := make([]any, len(vs))
				for i, v := range vs {
					l[i] = v
				}
				req.data[k] = l
			}
		}
	case "LIST":
		req.op = opList
	case http.MethodPost, http.MethodPut:
		req.op = opUpdate
		body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxRequestSize))
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				return nil, http.StatusRequestEntityTooLarge, errors.New("http: request body too large")
			}
			return nil, http.StatusBadRequest, err
		}
		if len(bytes.TrimSpace(body)) > 0 {
			dec := json.NewDecoder(bytes.NewReader(body))
			dec.UseNumber()
			var data map[string]any
			if err := dec.Decode(&data); err != nil {
				return nil, http.StatusBadRequest, fmt.Errorf("failed to parse JSON input: %w", err)
			}
			req.data = data
		}
	case http.MethodDelete:
		req.op = opDelete
	default:
		return nil, http.StatusMethodNotAllowed, nil
	}
	if req.data == nil {
		req.data = fields{}
	}
	return req, 0, nil
}

// handle runs a request through token checks, policy, audit and the
// backend, as Vault's Core.handleCancelableRequest.
func (s *Server) handle(req *request) (*response, error) {
	m, rt, vars := s.resolve(req.path)
	req.mount, req.vars = m, vars

	if rt == nil || !rt.unauth {
		tok, err := s.checkToken(req.client)
		if err != nil {
			s.auditRequest(req, nil, err)
			return nil, err
		}
		req.token = tok
	} else if req.client != "" {
		// Unauthenticated paths ignore a token but still use it for audit.
		req.token, _ = s.checkToken(req.client)
	}

	if rt != nil && req.op == opUpdate && rt.exists != nil && !rt.exists(req) {
		req.op = opCreate
	}

	if rt == nil || !rt.unauth {
		a := s.aclFor(req.token)
		allowed := a.allows(req.path, req.op, rt != nil && rt.sudo)
		s.useToken(req.token)
		if !allowed {
			s.auditRequest(req, a, errACLDenied)
			return nil, errACLDenied
		}
		s.auditRequest(req, a, nil)
	} else {
		s.auditRequest(req, nil, nil)
	}

	var resp *response
	var err error
	switch {
	case m == nil:
		err = &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("no handler for route %q. route entry not found.", req.path)}
	case rt == nil:
		err = errUnsupportedPath
	default:
		h := rt.ops[req.op]
		if h == nil && req.op == opCreate {
			h = rt.ops[opUpdate]
		}
		if h == nil {
			err = errUnsupportedOperation
			break
		}
		resp, err = h(req)
	}
	if err == nil && resp != nil {
		err = s.finish(req, resp)
	}
	s.auditResponse(req, resp, err)
	s.afterUse(req.token)
	return resp, err
}

// finish registers a leased secret or creates a login's token, as Vault's
// core does with a backend's response.
func (s *Server) finish(req *request, resp *response) error {
	if sec := resp.secret; sec != nil {
		if err := s.registerLease(req, resp, sec); err != nil {
			return err
		}
	}
	if resp.login != nil {
		if err := s.loginToken(req, resp); err != nil {
			return err
		}
	}
	return nil
}

// respond writes resp or err as Vault's respondLogical / respondError.
func (s *Server) respond(w http.ResponseWriter, req *request, resp *response, err error) {
	if err != nil {
		status, msg := errorStatus(err)
		respondError(w, status, msg)
		return
	}
	if resp == nil {
		if req.op == opRead || req.op == opList {
			respondError(w, http.StatusNotFound, "")
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if resp.empty {
		w.WriteHeader(resp.status)
		return
	}
	if resp.raw != nil {
		writeJSON(w, resp.status, resp.raw)
		return
	}
	if req.op == opList && resp.status == 0 && emptyList(resp) {
		respondError(w, http.StatusNotFound, "")
		return
	}
	env := map[string]any{
		"request_id":     req.id,
		"lease_id":       resp.leaseID,
		"renewable":      resp.renewable,
		"lease_duration": resp.leaseDuration,
		"data":           resp.data,
		"wrap_info":      nil,
		"warnings":       resp.warnings,
		"auth":           nil,
		"mount_type":     "",
	}
	if resp.auth != nil {
		env["auth"] = resp.auth
	}
	if req.mount != nil && !resp.noMountType {
		env["mount_type"] = req.mount.typ
	}
	status := resp.status
	if status == 0 {
		status = http.StatusOK
	}
	body, err := json.Marshal(env)
	if err != nil {
		respondError(w, http.StatusInternalServerError, multiErrorText(err.Error()))
		return
	}
	if injectsData(req.path) && len(resp.data) > 0 {
		// Vault's HTTPSysInjector: data keys first, then the envelope.
		var buf bytes.Buffer
		buf.WriteByte('{')
		for k, v := range resp.data {
			kb, _ := json.Marshal(k)
			vb, err := json.Marshal(v)
			if err != nil {
				continue
			}
			buf.Write(kb)
			buf.WriteByte(':')
			buf.Write(vb)
			buf.WriteByte(',')
		}
		buf.Write(body[1:])
		body = buf.Bytes()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
	w.Write([]byte("\n"))
}

// emptyList is Vault's rule that a list with no keys is a 404, unless it
// carries warnings or other data.
func emptyList(resp *response) bool {
	if len(resp.data) == 0 {
		return len(resp.warnings) == 0
	}
	keys, ok := resp.data["keys"]
	if !ok || keys == nil {
		return false
	}
	switch k := keys.(type) {
	case []string:
		return len(k) == 0
	case []any:
		return len(k) == 0
	}
	return false
}

func respondError(w http.ResponseWriter, status int, msg string) {
	errs := []string{}
	if msg != "" {
		errs = append(errs, msg)
	}
	writeJSON(w, status, map[string]any{"errors": errs})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// listResponse is logical.ListResponse.
func listResponse(keys []string) *response {
	if keys == nil {
		keys = []string{}
	}
	return &response{data: map[string]any{"keys": keys}}
}
