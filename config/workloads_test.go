package config

import "testing"

const workloadsBase = `
secrets:
  db: {vault: {path: database/creds/app}}
  local: {static: {username: u, password: p}}
vault:
  address: http://127.0.0.1:8200
postgres:
  - name: appdb
    upstream: db:5432
    credentials: db
  - name: localdb
    listen: unix:.s.PGSQL.5433
    upstream: db:5432
    credentials: local
`

func TestWorkloads(t *testing.T) {
	tests := []struct {
		name  string
		extra string
		want  []string // problems; none: valid
	}{
		{"valid", `
workloads:
  attribution: csi
  node_name: node-0
  rules:
    - match: {namespace: payments, service_account: api}
      vault_auth: {role: payments-api}
      allow: [appdb, localdb]
    - match: {namespace: payments, service_account: batch}
      allow: [localdb]
`, nil},
		{"required keys", `
workloads:
  rules:
    - match: {}
      allow: []
`, []string{"workloads.attribution: required", "workloads.node_name: required",
			"workloads.rules[0].match.namespace: required", "workloads.rules[0].match.service_account: required",
			"workloads.rules[0].allow: must list"}},
		{"bad values", `
workloads:
  attribution: labels
  node_name: Node_0
  peer_check: maybe
  csi: {endpoint: /csi.sock, driver: "bad driver", state_dir: rel}
  rules:
    - match: {namespace: Payments, service_account: api}
      vault_auth: {method: approle, role: r}
      allow: [appdb, nosuch]
`, []string{"workloads.attribution: must be one of csi", "workloads.node_name", "workloads.peer_check",
			"workloads.csi.endpoint", "workloads.csi.driver", "workloads.csi.state_dir",
			"workloads.rules[0].match.namespace", "workloads.rules[0].vault_auth.method",
			`workloads.rules[0].allow[1]: "nosuch" is neither`}},
		{"vault secrets need vault_auth; duplicate match", `
workloads:
  attribution: csi
  node_name: node-0
  rules:
    - match: {namespace: a, service_account: b}
      allow: [appdb]
    - match: {namespace: a, service_account: b}
      allow: [localdb]
`, []string{"workloads.rules[0].vault_auth: required", "workloads.rules[1].match: namespace \"a\""}},
		{"listen is a socket name in the pod's directory", `  - name: abs
    listen: unix:/run/x.sock
    upstream: db:5432
    credentials: local
  - name: clash
    listen: unix:.s.PGSQL.5433
    upstream: db:5432
    credentials: local
workloads: {attribution: csi, node_name: n, rules: [{match: {namespace: a, service_account: b}, allow: [localdb]}]}
`, []string{"postgres[2].listen", "postgres[3].listen: unix:.s.PGSQL.5433 is already used"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := workloadsBase + tt.extra
			cfg, lines := parseLines(t, fixture(t), src)
			checkLines(t, lines, tt.want)
			if tt.want != nil {
				return
			}
			w := cfg.Workloads
			if cfg.Postgres[0].Listen != DefaultWorkloadSocket || w.CSI.Driver != DefaultCSIDriver ||
				w.CSI.Audience != DefaultCSIAudience || w.PeerCheck != PeerCheckAuto || w.CSI.StateDir != DefaultWorkloadStateDir {
				t.Errorf("defaults not applied: listen %q, csi %+v, peer_check %q", cfg.Postgres[0].Listen, w.CSI, w.PeerCheck)
			}
			if a := w.Rules[0].VaultAuth; a.Method != "kubernetes" || a.Mount != "kubernetes" {
				t.Errorf("vault_auth defaults: %+v", a)
			}
			if r := w.Rule("payments", "api"); !r.Allows("appdb") || r.Allows("other") {
				t.Errorf("Rule(payments, api) = %+v", r)
			}
			if w.Rule("payments", "other") != nil {
				t.Error("a service account with no rule matched one")
			}
		})
	}
}
