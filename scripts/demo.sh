#!/usr/bin/env bash
# make demo: credproxy end to end on a throwaway PostgreSQL.
#
# Starts a private PostgreSQL that accepts only scram-sha-256 passwords,
# creates a role with a random password that only credproxy is given, and
# shows an app (psql) working through credproxy without any password, then
# the audit log of that session. Everything it starts and writes is removed
# at exit, also on failure or Ctrl-C. Works as root (PostgreSQL then runs as
# the postgres user) and as an ordinary user.
set -euo pipefail
umask 077
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps

heading "0. preparing: PostgreSQL binaries and bin/credproxy"
bash "$REPO_ROOT/scripts/deps.sh"
pg_init_env
build_credproxy
note "credproxy:  $("$CREDPROXY" version)"
note "postgresql: $("$PG_BINDIR/postgres" --version)"
make_workdir credproxy-demo

heading "1. starting a throwaway PostgreSQL (scram-sha-256 passwords only, 127.0.0.1)"
pg_start "$WORK/pg" "$(free_port)"
note "listening on 127.0.0.1:$PG_PORT, data in $WORK/pg/data"

heading "2. creating role 'app' with a random password, and database 'app' it owns"
APP_PW=$(random_secret)
printf '%s\n' "$APP_PW" >"$WORK/app.pw" # 0600: only credproxy's user reads it
pg_super <<SQL
CREATE ROLE app LOGIN PASSWORD '$APP_PW';
CREATE DATABASE app OWNER app;
SQL
note "the password is in $WORK/app.pw (mode $(stat -c %a "$WORK/app.pw")); only credproxy reads it"
note "PostgreSQL stores it as: $(pg_super -At -c "SELECT left(rolpassword, 18) || '...' FROM pg_authid WHERE rolname = 'app'")"

heading "3. without credproxy, connecting with no password is refused"
if "$PSQL" -X -w "host=127.0.0.1 port=$PG_PORT user=app dbname=app sslmode=disable" -c 'SELECT 1' >"$WORK/direct.out" 2>&1; then
	die "PostgreSQL accepted a connection without a password: the demo setup is wrong"
fi
note "psql says: $(head -n 1 "$WORK/direct.out")"

heading "4. starting credproxy: it holds the credential, the app will not"
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

heading "5. the app connects with no password (PGPASSWORD unset, empty PGPASSFILE)"
APP_DSN="host=127.0.0.1 port=$PROXY_PORT user=anything dbname=app sslmode=disable"
note "psql \"$APP_DSN\""
echo
"$PSQL" -X -w -e -v ON_ERROR_STOP=1 "$APP_DSN" <<'SQL'
CREATE TABLE greetings (id serial PRIMARY KEY, msg text NOT NULL);
INSERT INTO greetings (msg) VALUES ('hello'), ('from'), ('credproxy');
SELECT id, msg FROM greetings ORDER BY id;
SELECT current_user AS logged_in_upstream_as, current_database() AS database;
SQL

heading "6. what ops see: probes and Prometheus metrics (curl http://127.0.0.1:$ADMIN_PORT/metrics)"
note "/healthz: $(curl -fsS "http://127.0.0.1:$ADMIN_PORT/healthz")   /readyz: $(curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz")"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^credproxy_(sessions_total|sessions_active|bytes_total|upstream_connect_seconds_count|credential_fetch_seconds_count|ready)' | sed 's/^/   /'

heading "7. stopping credproxy (SIGTERM)"
kill -TERM "$CREDPROXY_PID"
rc=0
wait "$CREDPROXY_PID" || rc=$?
note "credproxy exited with status $rc"
((rc == 0)) || die "credproxy did not stop cleanly"

heading "8. the audit log of this session ($WORK/audit.jsonl)"
[[ -s $WORK/audit.jsonl ]] || die "the audit log is empty"
if command -v python3 >/dev/null; then
	python3 -c '
import json, sys
for line in sys.stdin:
    print(json.dumps(json.loads(line), separators=(", ", ": ")))
' <"$WORK/audit.jsonl"
else
	cat "$WORK/audit.jsonl"
fi

heading "9. the password never appears in the audit log or credproxy's log"
if grep -qF "$APP_PW" "$WORK/audit.jsonl"; then
	die "the password appears in the audit log"
fi
echo "password not in audit log: ok"
if grep -qF "$APP_PW" "$WORK/credproxy.log"; then
	die "the password appears in credproxy's operational log"
fi
echo "password not in credproxy log: ok"

heading "done: cleaning up (PostgreSQL stopped, $WORK removed)"
