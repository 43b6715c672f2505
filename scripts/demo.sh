#!/usr/bin/env bash
# make demo: credproxy end to end, in three acts, on this machine alone.
#
#   Act 1, PostgreSQL: a private PostgreSQL that accepts only scram-sha-256
#     passwords, a role whose random password only credproxy is given, and
#     psql working through credproxy with no password; probes, metrics, the
#     audit log.
#   Act 2, HTTP: `credproxy ca init`, a local HTTPS API (scripts/demoapi)
#     that wants a bearer token, curl through HTTPS_PROXY with no token
#     getting 200, an unrouted host getting 403, the audit records.
#   Act 3, Vault: only when a `vault` or `bao` binary is on PATH (or named
#     by VAULT_BIN): a dev server whose database secrets engine makes a
#     v-... PostgreSQL role for credproxy, the lease in the audit record,
#     the role gone once credproxy stops. Otherwise one line says so.
#   Finally: no secret of any act in any audit or operational log.
#
# Everything it starts and writes is removed at exit, also on failure or
# Ctrl-C. Works as root (PostgreSQL then runs as the postgres user) and as
# an ordinary user. It prints how long it took after the build.
set -euo pipefail
umask 077
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps

# act TEXT: the heading of an act, one sentence of what it proves.
act() { printf '\n%s%s\n%s%s\n' "$_B" "========================================================================" "$*" "$_N"; }

# show_audit FILE: the audit log, one record a line, a little easier to read.
show_audit() {
	[[ -s $1 ]] || die "the audit log $1 is empty"
	if command -v python3 >/dev/null; then
		python3 -c '
import json, sys
for line in sys.stdin:
    print(json.dumps(json.loads(line), separators=(", ", ": ")))
' <"$1"
	else
		cat "$1"
	fi
}

# stop_credproxy: SIGTERM, and a clean exit is required.
stop_credproxy() {
	local rc=0
	kill -TERM "$CREDPROXY_PID"
	wait "$CREDPROXY_PID" || rc=$?
	note "credproxy exited with status $rc"
	((rc == 0)) || die "credproxy did not stop cleanly"
}

# secret LABEL VALUE: VALUE must appear in no log (checked at the end).
SECRET_LABELS=() SECRET_VALUES=()
secret() { SECRET_LABELS+=("$1") SECRET_VALUES+=("$2"); }

heading "0. preparing: PostgreSQL binaries, bin/credproxy, the demo's HTTPS API"
bash "$REPO_ROOT/scripts/deps.sh"
pg_init_env
build_credproxy
make_workdir credproxy-demo
(cd "$REPO_ROOT" && go build -o "$WORK/demoapi" ./scripts/demoapi) || die "go build ./scripts/demoapi failed"
note "credproxy:  $("$CREDPROXY" version)"
note "postgresql: $("$PG_BINDIR/postgres" --version)"
cd "$WORK"
START=$(date +%s%N)

# ============================================================= Act 1: PostgreSQL

act "Act 1, PostgreSQL: an app with no password works in the database, because only credproxy holds the credential."

heading "1.1 starting a throwaway PostgreSQL (scram-sha-256 passwords only, 127.0.0.1)"
pg_start "$WORK/pg" "$(free_port)"
secret "the PostgreSQL superuser's password" "$PG_SUPERPW"
note "listening on 127.0.0.1:$PG_PORT, data in $WORK/pg/data"

heading "1.2 creating role 'app' with a random password, and database 'app' it owns"
APP_PW=$(random_secret)
secret "role app's password" "$APP_PW"
printf '%s\n' "$APP_PW" >"$WORK/app.pw" # 0600: only credproxy's user reads it
pg_super <<SQL
CREATE ROLE app LOGIN PASSWORD '$APP_PW';
CREATE DATABASE app OWNER app;
SQL
note "the password is in $WORK/app.pw (mode $(stat -c %a "$WORK/app.pw")); only credproxy reads it"
note "PostgreSQL stores it as: $(pg_super -At -c "SELECT left(rolpassword, 18) || '...' FROM pg_authid WHERE rolname = 'app'")"

heading "1.3 without credproxy, connecting with no password is refused"
if "$PSQL" -X -w "host=127.0.0.1 port=$PG_PORT user=app dbname=app sslmode=disable" -c 'SELECT 1' >"$WORK/direct.out" 2>&1; then
	die "PostgreSQL accepted a connection without a password: the demo setup is wrong"
fi
note "psql says: $(head -n 1 "$WORK/direct.out")"

heading "1.4 starting credproxy: it holds the credential, the app will not"
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$WORK/credproxy.yaml" <<YAML
shutdown_grace: 5s
admin:
  listen: 127.0.0.1:$ADMIN_PORT
audit:
  path: ./audit.jsonl
  queries: true
secrets:
  demo:
    static:
      username: app
      password_file: ./app.pw
postgres:
  - name: demo
    listen: 127.0.0.1:$PROXY_PORT
    upstream: 127.0.0.1:$PG_PORT
    credentials: demo
    tls:
      mode: disable
YAML
sed 's/^/   | /' "$WORK/credproxy.yaml"
start_credproxy "$WORK/credproxy.yaml" "$WORK/credproxy.log" "$PROXY_PORT"
note "credproxy (pid $CREDPROXY_PID) listens on 127.0.0.1:$PROXY_PORT"

heading "1.5 the app connects with no password (PGPASSWORD unset, empty PGPASSFILE)"
APP_DSN="host=127.0.0.1 port=$PROXY_PORT user=anything dbname=app sslmode=disable"
note "psql \"$APP_DSN\""
echo
"$PSQL" -X -w -e -v ON_ERROR_STOP=1 "$APP_DSN" <<'SQL'
CREATE TABLE greetings (id serial PRIMARY KEY, msg text NOT NULL);
INSERT INTO greetings (msg) VALUES ('hello'), ('from'), ('credproxy');
SELECT id, msg FROM greetings ORDER BY id;
SELECT current_user AS logged_in_upstream_as, current_database() AS database;
SQL

heading "1.6 what ops see: probes and Prometheus metrics (curl http://127.0.0.1:$ADMIN_PORT/metrics)"
note "/healthz: $(curl -fsS "http://127.0.0.1:$ADMIN_PORT/healthz")   /readyz: $(curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz")"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^credproxy_(sessions_total|sessions_active|bytes_total|upstream_connect_seconds_count|credential_fetch_seconds_count|ready)' | sed 's/^/   /'

heading "1.7 stopping credproxy (SIGTERM)"
stop_credproxy

heading "1.8 the audit log of this session ($WORK/audit.jsonl)"
show_audit "$WORK/audit.jsonl"

# ================================================================== Act 2: HTTP

act "Act 2, HTTP: an HTTPS client with no token calls an API that demands one, and hosts without a route are refused."

heading "2.1 credproxy ca init: the CA credproxy signs its interception certificates with"
"$CREDPROXY" ca init --out ca >"$WORK/ca-init.out"
note "$(head -n 1 "$WORK/ca-init.out")"
note "(it goes on to say how apps trust it; here curl is given --cacert ca/ca.pem)"

heading "2.2 a local HTTPS API that answers 401 without \"Authorization: Bearer <token>\""
API_PORT=$(free_port)
random_secret >"$WORK/api.token" # 0600: only credproxy and the API read it
API_TOKEN=$(<"$WORK/api.token")
secret "the API's bearer token" "$API_TOKEN"
show_log_on_failure "$WORK/api.log"
"$WORK/demoapi" -listen "127.0.0.1:$API_PORT" -token-file "$WORK/api.token" -ca-out "$WORK/api-ca.pem" >"$WORK/api.log" 2>&1 &
API_PID=$!
at_exit stop_pid "$API_PID"
wait_listen "$API_PORT" "$API_PID" "the demo API"
API_URL="https://localhost:$API_PORT/v1/whoami"
note "scripts/demoapi on 127.0.0.1:$API_PORT, its certificate from its own CA (api-ca.pem); the token is in api.token"
note "curl --cacert api-ca.pem $API_URL (straight to the API, no token):"
curl -sS --max-time 10 --cacert api-ca.pem -w '   HTTP %{http_code}\n' "$API_URL" | sed 's/^{/   {/'
note "$(tail -n 1 "$WORK/api.log")"

heading "2.3 starting credproxy with a route for the API: it injects the token from api.token"
HTTP_PORT=$(free_port)
cat >"$WORK/credproxy-http.yaml" <<YAML
audit:
  path: ./audit-http.jsonl
secrets:
  demo-api:
    static:
      token_file: ./api.token
http:
  listen: 127.0.0.1:$HTTP_PORT
  ca: {cert_file: ./ca/ca.pem, key_file: ./ca/ca-key.pem}
  upstream_ca_file: ./api-ca.pem    # the API's own CA
  default: deny                     # hosts without a route get 403
  routes:
    - host: localhost:$API_PORT
      credentials: demo-api
      inject:
        header: {name: Authorization, value: "Bearer {{ .token }}"}
YAML
sed 's/^/   | /' "$WORK/credproxy-http.yaml"
"$CREDPROXY" validate --config "$WORK/credproxy-http.yaml" >/dev/null 2>"$WORK/validate-http.out" ||
	die "invalid config: $(cat "$WORK/validate-http.out")"
note "credproxy validate accepts it, with a warning that matters on a machine shared with other users:"
sed 's/^/   /' "$WORK/validate-http.out"
start_credproxy "$WORK/credproxy-http.yaml" "$WORK/credproxy-http.log" "$HTTP_PORT"
note "credproxy (pid $CREDPROXY_PID) is an HTTP proxy on 127.0.0.1:$HTTP_PORT"

heading "2.4 curl through HTTPS_PROXY, with nothing in its environment but PATH and HTTPS_PROXY"
note "env -i PATH=\$PATH HTTPS_PROXY=http://127.0.0.1:$HTTP_PORT curl --cacert ca/ca.pem $API_URL"
app_curl() { env -i PATH="$PATH" HTTPS_PROXY="http://127.0.0.1:$HTTP_PORT" curl -sS --max-time 10 --cacert ca/ca.pem "$@"; }
app_curl -w '   HTTP %{http_code}\n' "$API_URL" >"$WORK/curl-routed.out" 2>&1 || true
sed 's/^{/   {/' "$WORK/curl-routed.out"
grep -q '^   HTTP 200$' "$WORK/curl-routed.out" || die "the request through credproxy did not get 200"
note "$(tail -n 1 "$WORK/api.log")"

heading "2.5 the same request to a host with no route: 403, and no tunnel is opened"
note "env -i PATH=\$PATH HTTPS_PROXY=http://127.0.0.1:$HTTP_PORT curl --cacert ca/ca.pem https://api.example.com/v1/whoami"
app_curl "https://api.example.com/v1/whoami" >"$WORK/curl-unrouted.out" 2>&1 && die "credproxy let a request to an unrouted host through"
sed 's/^/   /' "$WORK/curl-unrouted.out"
grep -q 'response 403' "$WORK/curl-unrouted.out" || die "the unrouted host did not get 403"

heading "2.6 stopping credproxy; the audit records of both requests ($WORK/audit-http.jsonl)"
stop_credproxy
show_audit "$WORK/audit-http.jsonl"
awk '/"event":"request"/ && /"status":200/ && /"injected":true/ { f = 1 } END { exit !f }' "$WORK/audit-http.jsonl" ||
	die "no audit record of the injected request"
awk '/"event":"denied"/ && /"reason":"no route"/ { f = 1 } END { exit !f }' "$WORK/audit-http.jsonl" ||
	die "no audit record of the refusal"
note "the 200: a request record with \"injected\": true, inside the tunnel's session_start and session_end;"
note "the 403: a denied record (\"reason\": \"no route\") and a request record with \"injected\": false"

# ================================================================= Act 3: Vault

# A path, so that the vault function below never calls itself.
if [[ -n ${VAULT_BIN:-} ]]; then
	VAULT=$(command -v "$VAULT_BIN") || die "VAULT_BIN=$VAULT_BIN: no such program"
else
	VAULT=$(command -v vault || command -v bao || true)
fi
if [[ -z $VAULT ]]; then
	heading "Act 3, Vault: skipped (no vault or bao on PATH, nor VAULT_BIN); with one, make demo shows psql running as a v-... role that a Vault dev server creates, its lease in the audit record, and the role dropped when credproxy stops."
else
	act "Act 3, Vault: credproxy logs in as a short-lived user that Vault creates, and that user is gone once credproxy stops."

	unset "${!VAULT_@}" "${!BAO_@}" # nothing of the caller's Vault reaches this one
	# A dev server also listens on the next port, for its cluster.
	VAULT_PORT=$(free_port)
	while is_listening $((VAULT_PORT + 1)); do VAULT_PORT=$(free_port); done
	VCLI=$(basename "$VAULT") # vault or bao: the same commands
	heading "3.1 a $VCLI dev server (in memory) on 127.0.0.1:$VAULT_PORT"
	VAULT_ROOT=$(random_secret)
	secret "the Vault root token" "$VAULT_ROOT"
	mkdir -m 0700 "$WORK/vault"
	show_log_on_failure "$WORK/vault/server.log"
	# HOME: a dev server writes its root token to ~/.vault-token.
	HOME=$WORK/vault VAULT_DEV_ROOT_TOKEN_ID=$VAULT_ROOT BAO_DEV_ROOT_TOKEN_ID=$VAULT_ROOT \
		"$VAULT" server -dev -dev-listen-address="127.0.0.1:$VAULT_PORT" >"$WORK/vault/server.log" 2>&1 &
	VAULT_PID=$!
	at_exit stop_pid "$VAULT_PID"
	wait_listen "$VAULT_PORT" "$VAULT_PID" "$VCLI server -dev"
	# vault: the CLI as root, on this server only (bao reads BAO_*, then VAULT_*).
	vault() {
		HOME=$WORK/vault VAULT_ADDR="http://127.0.0.1:$VAULT_PORT" VAULT_TOKEN=$VAULT_ROOT \
			BAO_ADDR="http://127.0.0.1:$VAULT_PORT" BAO_TOKEN=$VAULT_ROOT "$VAULT" "$@"
	}
	for i in $(seq 100); do
		vault status >/dev/null 2>&1 && break
		((i < 100)) || die "the dev server is not ready after 10s"
		sleep 0.1
	done
	note "$(vault version)"

	heading "3.2 the database secrets engine: role 'app' makes PostgreSQL users that are members of app, for 5 minutes"
	printf '%s' "$PG_SUPERPW" >"$WORK/vault/pg.pw" # Vault logs in as the superuser here; in production, a role with CREATEROLE
	note "$VCLI secrets enable database"
	vault secrets enable database >/dev/null
	PG_URL="postgresql://{{username}}:{{password}}@127.0.0.1:$PG_PORT/app?sslmode=disable"
	note "$VCLI write database/config/demo plugin_name=postgresql-database-plugin allowed_roles=app"
	note "    connection_url=$PG_URL username=postgres password=@vault/pg.pw"
	vault write database/config/demo plugin_name=postgresql-database-plugin allowed_roles=app \
		connection_url="$PG_URL" username=postgres password=@vault/pg.pw >/dev/null
	CREATE_SQL="CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE app;"
	DROP_SQL="DROP ROLE IF EXISTS \"{{name}}\";"
	note "$VCLI write database/roles/app db_name=demo default_ttl=5m max_ttl=1h"
	note "    creation_statements=$CREATE_SQL"
	note "    revocation_statements=$DROP_SQL"
	vault write database/roles/app db_name=demo default_ttl=5m max_ttl=1h \
		creation_statements="$CREATE_SQL" revocation_statements="$DROP_SQL" >/dev/null

	heading "3.3 credproxy's token: a policy that may read database/creds/app and renew or revoke its leases"
	cat >"$WORK/vault/credproxy-demo.hcl" <<'HCL'
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew"   { capabilities = ["update"] }
path "sys/leases/revoke"  { capabilities = ["update"] }
HCL
	sed 's/^/   | /' "$WORK/vault/credproxy-demo.hcl"
	note "$VCLI policy write credproxy-demo vault/credproxy-demo.hcl"
	vault policy write credproxy-demo vault/credproxy-demo.hcl >/dev/null
	note "$VCLI token create -policy=credproxy-demo -ttl=1h -field=token > vault/token"
	vault token create -policy=credproxy-demo -ttl=1h -field=token >"$WORK/vault/token"
	secret "credproxy's Vault token" "$(<"$WORK/vault/token")"

	heading "3.4 starting credproxy with a Vault secret"
	VPROXY_PORT=$(free_port)
	cat >"$WORK/credproxy-vault.yaml" <<YAML
shutdown_grace: 5s
audit:
  path: ./audit-vault.jsonl
secrets:
  app-dynamic:
    vault: {path: database/creds/app}
vault:
  address: http://127.0.0.1:$VAULT_PORT
  revoke_on_shutdown: true
  auth: {method: token, token_file: ./vault/token}
postgres:
  - name: demo-vault
    listen: 127.0.0.1:$VPROXY_PORT
    upstream: 127.0.0.1:$PG_PORT
    credentials: app-dynamic
    tls: {mode: disable}
YAML
	sed 's/^/   | /' "$WORK/credproxy-vault.yaml"
	start_credproxy "$WORK/credproxy-vault.yaml" "$WORK/credproxy-vault.log" "$VPROXY_PORT"

	heading "3.5 the app connects with no password, as before; upstream it is a user Vault made"
	VAPP_DSN="host=127.0.0.1 port=$VPROXY_PORT user=anything dbname=app sslmode=disable"
	note "psql \"$VAPP_DSN\""
	echo
	"$PSQL" -X -w -e -v ON_ERROR_STOP=1 "$VAPP_DSN" <<'SQL'
SELECT current_user AS logged_in_upstream_as, (SELECT count(*) FROM greetings) AS greetings;
SQL
	DYN_USER=$(pg_super -At -c "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'")
	[[ $DYN_USER == v-* && $DYN_USER != *$'\n'* ]] || die "expected one v-... role in PostgreSQL, found: '$DYN_USER'"

	heading "3.6 its audit record: the lease as a hash and a TTL, never its id"
	grep '"event":"session_start"' "$WORK/audit-vault.jsonl" >"$WORK/audit-vault-start.jsonl" || die "no session_start record"
	show_audit "$WORK/audit-vault-start.jsonl"
	LEASE_KEYS=$(vault list -format=json sys/leases/lookup/database/creds/app/ | tr -d '[]", ' | grep -v '^$' || true)
	[[ -n $LEASE_KEYS && $LEASE_KEYS != *$'\n'* ]] || die "expected one lease under database/creds/app, found: '$LEASE_KEYS'"
	secret "the lease id" "$LEASE_KEYS"
	LEASE_HASH=$(printf '%s' "database/creds/app/$LEASE_KEYS" | sha256sum | cut -d' ' -f1)
	grep -qF "\"id_sha256\":\"$LEASE_HASH\"" "$WORK/audit-vault-start.jsonl" ||
		die "the audit record's lease is not the one Vault lists"
	note "Vault lists one lease under database/creds/app; its id's SHA-256 is the id_sha256 above"

	heading "3.7 stopping credproxy: it revokes its lease (revoke_on_shutdown), and Vault drops $DYN_USER"
	note "before: $(pg_super -At -c "SELECT count(*) FROM pg_roles WHERE rolname = '$DYN_USER'") role named $DYN_USER in pg_roles"
	stop_credproxy
	gone=
	for _ in $(seq 50); do
		if [[ $(pg_super -At -c "SELECT count(*) FROM pg_roles WHERE rolname = '$DYN_USER'") == 0 ]]; then
			gone=1
			break
		fi
		sleep 0.1
	done
	[[ -n $gone ]] || die "$DYN_USER is still in PostgreSQL after credproxy stopped"
	note "after:  0 roles named $DYN_USER in pg_roles"
fi

# ======================================================================= Finally

act "Finally: no secret of any act appears in an audit log, credproxy's logs, or what the app saw."
LOGS=("$WORK"/audit*.jsonl "$WORK"/credproxy*.log "$WORK"/validate-*.out "$WORK"/curl-*.out "$WORK/api.log")
note "checked: ${LOGS[*]##*/}"
for i in "${!SECRET_VALUES[@]}"; do
	for f in "${LOGS[@]}"; do
		grep -qF -- "${SECRET_VALUES[i]}" "$f" && die "${SECRET_LABELS[i]} appears in $f"
	done
	note "${SECRET_LABELS[i]}: in none of them, ok"
done

heading "done in $((($(date +%s%N) - START) / 1000000000)) s after the build; cleaning up (every process stopped, $WORK removed)"
