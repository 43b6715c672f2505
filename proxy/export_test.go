package proxy

import "errors"

// Test hooks for the tests of package proxy_test, which build servers
// with the real protocols (package proxy cannot import them).

// SetHookReloadBound makes f run once a reload has bound its new
// listeners and before it commits.
func SetHookReloadBound(s *Server, f func()) { s.hookReloadBound = f }

// SetHookCloseLocking makes f run as Close is about to wait for a reload
// in progress.
func SetHookCloseLocking(s *Server, f func()) { s.hookCloseLocking = f }

// WorkloadToken is the token pod podUID's workload key logs in to Vault
// with: the latest of its live pods' tokens.
func WorkloadToken(s *Server, podUID string) (string, error) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	p, ok := s.pods.pods[podUID]
	if !ok || p.tenant == nil {
		return "", errors.New("no such pod, or no rule")
	}
	tok, err := p.tenant.token()
	return tok.Reveal(), err
}

// WorkloadKeys counts the open workload keys (their credential stores).
func WorkloadKeys(s *Server) int {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	return len(s.pods.tenants)
}

// KeepAliveFor is keepAliveFor, for tests.
var KeepAliveFor = keepAliveFor
