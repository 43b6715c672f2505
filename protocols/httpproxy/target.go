package httpproxy

import (
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// The request screen's audit reasons, and its messages.
const (
	reasonBadRequest   = "bad request"
	reasonMethod       = "method not allowed"
	reasonProtocol     = "unsupported protocol"
	msgH2NotSupported  = "credproxy: HTTP/2 is not supported through credproxy; use HTTP/1.1"
	msgTargetForms     = "send origin-form (/path?query) or an absolute http(s) URL"
	maxTargetInMessage = 64
)

// screen refuses what credproxy forwards on no path, before any routing:
// HTTP/2's PRI (as the h2 preface, 505; as any other request, 405) and a
// request-target that is not origin-form or absolute-form (see
// checkTarget). It returns status 0 for a request that may go on.
func screen(r *http.Request) (status int, reason, msg string) {
	if strings.EqualFold(r.Method, "PRI") {
		if r.RequestURI == "*" {
			return http.StatusHTTPVersionNotSupported, reasonProtocol, msgH2NotSupported
		}
		return http.StatusMethodNotAllowed, reasonMethod, "credproxy: method PRI is not forwarded"
	}
	if err := checkTarget(r); err != nil {
		return http.StatusBadRequest, reasonBadRequest, "credproxy: " + err.Error()
	}
	return 0, "", ""
}

// echoMethod reports whether method makes a server send the request back
// (RFC 9110 section 9.3.8; TRACK is IIS's TRACE): with a credential
// injected, that would hand it to the app. Methods are case-sensitive,
// but some servers are not.
func echoMethod(method string) bool {
	return strings.EqualFold(method, http.MethodTrace) || strings.EqualFold(method, "TRACK")
}

// checkTarget accepts the two request-target forms credproxy forwards
// (RFC 9112 section 3.2): origin-form ("/path?query") and absolute-form
// naming an http or https authority ("https://host/path?query"). Which of
// the two a path takes, and that an absolute URL names the routed
// authority, is the caller's to check; either way only origin-form goes
// upstream.
//
// Everything else is refused, because someone downstream reads it
// differently from credproxy: an opaque URL ("https:http://evil/x",
// "http:evil/x") has no URL host for the Host check to compare, yet is a
// target naming another host to a front end that routes on it;
// asterisk-form ("*") and authority-form ("host:port") belong to OPTIONS
// and CONNECT; userinfo and fragments are never part of a request. The
// error is safe to show the client.
func checkTarget(r *http.Request) error {
	raw, u := r.RequestURI, r.URL
	switch {
	case raw == "*":
		return errors.New("asterisk-form request-target (*) is not forwarded; " + msgTargetForms)
	case strings.IndexByte(raw, '#') >= 0:
		return errors.New("request-target " + quoteTarget(raw) + " has a fragment; " + msgTargetForms)
	case strings.HasPrefix(raw, "/"):
		if u.Scheme != "" || u.Host != "" || u.Opaque != "" || u.User != nil {
			return errors.New("request-target " + quoteTarget(raw) + " is not origin-form; " + msgTargetForms)
		}
		return nil
	case u.Opaque != "" || u.Scheme == "":
		return errors.New("request-target " + quoteTarget(raw) + " is not origin-form or an absolute URL; " + msgTargetForms)
	case u.Scheme != "http" && u.Scheme != "https":
		return errors.New("request-target " + quoteTarget(raw) + " is not an http or https URL; " + msgTargetForms)
	case u.User != nil:
		return errors.New("request-target " + quoteTarget(raw) + " has userinfo; credproxy supplies the credential")
	case u.Host == "":
		return errors.New("request-target " + quoteTarget(raw) + " has no host; " + msgTargetForms)
	case u.Path != "" && !strings.HasPrefix(u.Path, "/"):
		return errors.New("request-target " + quoteTarget(raw) + " has a relative path; " + msgTargetForms)
	}
	return nil
}

// quoteTarget quotes the start of an app-supplied target for a message.
func quoteTarget(raw string) string {
	if len(raw) > maxTargetInMessage {
		raw = raw[:maxTargetInMessage] + "…"
	}
	return strconv.Quote(raw)
}

// originURL is the URL credproxy sends upstream for r: scheme and
// authority of the route, and r's path and query, nothing else. The
// request line written from it is always origin-form.
func originURL(scheme, host string, u *url.URL) *url.URL {
	return &url.URL{Scheme: scheme, Host: host, Path: u.Path, RawPath: u.RawPath,
		RawQuery: u.RawQuery, ForceQuery: u.ForceQuery}
}
