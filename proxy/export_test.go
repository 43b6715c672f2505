package proxy

// Test hooks for the tests of package proxy_test, which build servers
// with the real protocols (package proxy cannot import them).

// SetHookReloadBound makes f run once a reload has bound its new
// listeners and before it commits.
func SetHookReloadBound(s *Server, f func()) { s.hookReloadBound = f }

// SetHookCloseLocking makes f run as Close is about to wait for a reload
// in progress.
func SetHookCloseLocking(s *Server, f func()) { s.hookCloseLocking = f }
