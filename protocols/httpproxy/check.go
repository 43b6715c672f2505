package httpproxy

import "github.com/credproxy/credproxy/config"

// check runs every step of New that can fail on a configuration — each
// route (its host and injector: templates, header name), the CA (a CA
// certificate allowed to sign, valid now, matching its key) and the
// upstream roots — and returns every problem, each starting with its key
// path, where New stops at the first. It builds nothing that needs
// releasing: no certificate manager, no servers. `credproxy validate`
// uses it (Protocol.Check); anything New checks beyond it still fails
// validate, which calls New as well.
func check(cfg config.HTTP) []error {
	var errs []error
	for i, rc := range cfg.Routes {
		if _, err := newRoute(i, rc); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := LoadCA(cfg.CA.CertFile, cfg.CA.KeyFile); err != nil {
		errs = append(errs, err)
	}
	if _, err := upstreamRoots(cfg.UpstreamCAFile); err != nil {
		errs = append(errs, &config.FieldError{Path: "http.upstream_ca_file", Msg: err.Error()})
	}
	return errs
}
