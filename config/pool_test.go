package config

import (
	"testing"
	"time"
)

func TestPoolKeys(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{name: "absent: off", src: appSecret + pg()},
		{name: "every key", src: appSecret + pg("pool: {max_server_connections: 5, idle_timeout: 30s, max_lifetime: 10m, reset_query: DISCARD ALL, wait_timeout: 2s}")},
		{name: "empty block: defaults", src: appSecret + pg("pool: {}")},
		{name: "bad values", src: appSecret + pg("pool: {max_server_connections: 0, idle_timeout: 0s, max_lifetime: -1s, reset_query: \" \", wait_timeout: 0s}"), want: []string{
			"postgres[0].pool.max_server_connections: must be greater than 0",
			"postgres[0].pool.idle_timeout: must be greater than 0",
			"postgres[0].pool.max_lifetime: must be greater than 0",
			"postgres[0].pool.wait_timeout: must be greater than 0",
			"postgres[0].pool.reset_query: must not be empty",
		}},
		{name: "unknown key", src: appSecret + pg("pool: {max_connections: 5}"), want: []string{
			"postgres[0].pool.max_connections: unknown key",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, got := parseLines(t, fixture(t), tt.src)
			checkLines(t, got, tt.want)
		})
	}
}

func TestPoolResetQueryWarning(t *testing.T) {
	cfg, lines := parseLines(t, fixture(t), appSecret+pg("pool: {reset_query: \"RESET ALL\"}"))
	if len(lines) > 0 {
		t.Fatal(lines)
	}
	var got []string
	for _, w := range cfg.Warnings() {
		got = append(got, w.Error())
	}
	checkLines(t, got, []string{`postgres[0].pool.reset_query: "RESET ALL" does not run DISCARD ALL`})
	cfg, _ = parseLines(t, fixture(t), appSecret+pg("pool: {reset_query: \"discard all; set x.y = 1\"}"))
	if len(cfg.Warnings()) != 0 {
		t.Errorf("a reset query that runs DISCARD ALL warns: %v", cfg.Warnings())
	}
}

func TestPoolDefaults(t *testing.T) {
	cfg, lines := parseLines(t, fixture(t), appSecret+pg())
	if len(lines) > 0 {
		t.Fatal(lines)
	}
	if cfg.Postgres[0].Pool != nil {
		t.Errorf("no pool block: Pool = %+v, want nil (reuse off)", cfg.Postgres[0].Pool)
	}
	cfg, lines = parseLines(t, fixture(t), appSecret+pg("connect_timeout: 3s", "pool: {idle_timeout: 5s}"))
	if len(lines) > 0 {
		t.Fatal(lines)
	}
	got := cfg.Postgres[0].Pool
	want := PostgresPool{MaxServerConnections: 20, IdleTimeout: Duration(5 * time.Second), MaxLifetime: Duration(time.Hour),
		ResetQuery: "DISCARD ALL", WaitTimeout: Duration(3 * time.Second)}
	if got == nil || *got != want {
		t.Errorf("pool defaults = %+v, want %+v", got, want)
	}
}
