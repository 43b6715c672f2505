package httpproxy

import (
	"testing"

	"github.com/credproxy/credproxy/config"
)

func TestSplitAuthority(t *testing.T) {
	for _, tc := range []struct {
		in, def, host, port string
		bad                 bool
	}{
		{in: "api.test", def: "443", host: "api.test", port: "443"},
		{in: "API.Test.", def: "443", host: "api.test", port: "443"},
		{in: "api.test:8443", def: "443", host: "api.test", port: "8443"},
		{in: "api.test:08443", def: "443", host: "api.test", port: "8443"},
		{in: "api.test:", def: "80", host: "api.test", port: "80"},
		{in: "[::1]:443", def: "80", host: "::1", port: "443"},
		{in: "[0:0::1]", def: "80", host: "::1", port: "80"},
		{in: "::1", def: "80", host: "::1", port: "80"},
		{in: "127.0.0.1:80", def: "443", host: "127.0.0.1", port: "80"},
		{in: "under_score.test", def: "443", host: "under_score.test", port: "443"},
		{in: "", bad: true},
		{in: ".", bad: true},
		{in: "api.test..", bad: true},
		{in: "api..test", bad: true},
		{in: ".api.test", bad: true},
		{in: "api.test:0", bad: true},
		{in: "api.test:65536", bad: true},
		{in: "api.test:+443", bad: true},
		{in: "api.test:44 3", bad: true},
		{in: "api.test:443:1", bad: true},
		{in: "api.tést", bad: true},
		{in: "api.test\x00.evil", bad: true},
		{in: "api.test/evil", bad: true},
		{in: "user@api.test", bad: true},
		{in: "*.api.test", bad: true},
		{in: "[::1", bad: true},
		{in: "[::1]x", bad: true},
		{in: "[127.0.0.1]:443", bad: true},
		{in: "[api.test]:443", bad: true},
	} {
		if tc.def == "" {
			tc.def = "443"
		}
		host, port, err := splitAuthority(tc.in, tc.def)
		if (err != nil) != tc.bad || host != tc.host || port != tc.port {
			t.Errorf("splitAuthority(%q) = %q, %q, %v", tc.in, host, port, err)
		}
	}
}

func TestRouteMatch(t *testing.T) {
	table, err := newRouteTable([]config.HTTPRoute{
		headerRoute("api.test"),
		headerRoute("*.wild.test"),
		headerRoute("*.deep.wild.test"),
		headerRoute("port.test:8443"),
		headerRoute("API2.TEST."),
		headerRoute("[::1]:443"),
		headerRoute("10.0.0.1"),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host, port, def, want string
	}{
		{"api.test", "443", "443", "api.test"},
		{"api.test", "80", "80", "api.test"},
		{"api.test", "8443", "443", ""},
		{"api.test", "443", "80", ""}, // port 443 is not http's default
		{"api2.test", "443", "443", "API2.TEST."},
		{"api.test.evil.test", "443", "443", ""},
		{"evil.api.test", "443", "443", ""},
		{"xapi.test", "443", "443", ""},
		{"a.wild.test", "443", "443", "*.wild.test"},
		{"a.b.c.wild.test", "443", "443", "*.wild.test"},
		{"wild.test", "443", "443", ""},
		{"xwild.test", "443", "443", ""},
		{"a.deep.wild.test", "443", "443", "*.deep.wild.test"},
		{"deep.wild.test", "443", "443", "*.wild.test"},
		{"wild.test.evil.test", "443", "443", ""},
		{"port.test", "8443", "443", "port.test:8443"},
		{"port.test", "8443", "80", "port.test:8443"},
		{"port.test", "443", "443", ""},
		{"::1", "443", "443", "[::1]:443"},
		{"10.0.0.1", "443", "443", "10.0.0.1"},
		{"10.0.0.2", "443", "443", ""},
	} {
		r := table.match(tc.host, tc.port, tc.def)
		got := ""
		if r != nil {
			got = r.name()
		}
		if got != tc.want {
			t.Errorf("match(%s, %s, def %s) = %q, want %q", tc.host, tc.port, tc.def, got, tc.want)
		}
	}
	if !table.routed("a.wild.test") || table.routed("wild.test") || !table.routed("port.test") {
		t.Error("routed")
	}
}

func TestRoutePrecedence(t *testing.T) {
	table, err := newRouteTable([]config.HTTPRoute{headerRoute("*.x.test"), headerRoute("a.x.test"), headerRoute("b.x.test"), headerRoute("b.x.test:443")})
	if err != nil {
		t.Fatal(err)
	}
	if r := table.match("a.x.test", "443", "443"); r == nil || r.name() != "a.x.test" {
		t.Errorf("exact must beat wildcard: %v", r)
	}
	if r := table.match("b.x.test", "443", "443"); r == nil || r.name() != "b.x.test:443" {
		t.Errorf("explicit port must beat default: %v", r)
	}
}
