package vaulttest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// The Kubernetes auth method's login with a real TokenReview, as the
// vault-plugin-auth-kubernetes does when the config has no pem_keys: the
// login JWT is sent to kubernetes_host's TokenReview API (trusting
// kubernetes_ca_cert), authenticated with token_reviewer_jwt or, when that
// is empty, with the login JWT itself (the client's service account then
// needs system:auth-delegator). The review asks for the role's audience
// when it has one. The answer, not the token's claims, says who the
// caller is; the claims (read unverified) must agree with it, as the
// plugin checks.

// reviewed is who a TokenReview says a token is.
type reviewed struct {
	namespace, name, uid string
	podName, podUID      string
}

// review calls the TokenReview API.
func (c *k8sConfig) review(ctx context.Context, jwt, audience string) (*reviewed, error) {
	type review struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Spec       struct {
			Token     string   `json:"token"`
			Audiences []string `json:"audiences,omitempty"`
		} `json:"spec"`
		Status struct {
			Authenticated bool   `json:"authenticated"`
			Error         string `json:"error"`
			User          struct {
				Username string              `json:"username"`
				UID      string              `json:"uid"`
				Extra    map[string][]string `json:"extra"`
			} `json:"user"`
			Audiences []string `json:"audiences"`
		} `json:"status"`
	}
	var req review
	req.APIVersion, req.Kind = "authentication.k8s.io/v1", "TokenReview"
	req.Spec.Token = jwt
	if audience != "" {
		req.Spec.Audiences = []string{audience}
	}
	body, _ := json.Marshal(req)
	pool := x509.NewCertPool()
	if c.caCert != "" && !pool.AppendCertsFromPEM([]byte(c.caCert)) {
		return nil, errors.New("kubernetes_ca_cert: no PEM certificate")
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
	}}
	defer hc.CloseIdleConnections()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost,
		strings.TrimSuffix(c.host, "/")+"/apis/authentication.k8s.io/v1/tokenreviews", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	bearer := c.tokenReviewerJWT
	if bearer == "" {
		bearer = jwt
	}
	hreq.Header.Set("Authorization", "Bearer "+bearer)
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(hreq)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("lookup failed: %s", resp.Status)
	}
	var out review
	if err := json.Unmarshal(data, &out); err != nil {
		return nil, err
	}
	if !out.Status.Authenticated {
		return nil, errors.New("lookup failed: service account jwt not valid")
	}
	parts := strings.Split(out.Status.User.Username, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return nil, errors.New("lookup failed: unexpected username format")
	}
	if audience != "" && !contains(out.Status.Audiences, audience) {
		return nil, errors.New("invalid audience (aud) claim: audience claim does not match any expected audience")
	}
	r := &reviewed{namespace: parts[2], name: parts[3], uid: out.Status.User.UID}
	if v := out.Status.User.Extra["authentication.kubernetes.io/pod-name"]; len(v) == 1 {
		r.podName = v[0]
	}
	if v := out.Status.User.Extra["authentication.kubernetes.io/pod-uid"]; len(v) == 1 {
		r.podUID = v[0]
	}
	return r, nil
}

// unverifiedClaims reads a JWT's claims without checking its signature.
func unverifiedClaims(jwt string) (map[string]any, error) {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return nil, errors.New("not a compact JWS")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, err
	}
	all := map[string]any{}
	if err := json.Unmarshal(payload, &all); err != nil {
		return nil, err
	}
	return all, nil
}
