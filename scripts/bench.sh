#!/usr/bin/env bash
# make bench: credproxy against a direct connection and against PgBouncer.
#
# One run prints one table:
#   (a) pgbench select-only (-S) TPS, 8 clients (-c 8 -j 2); and (a')
#       through a second credproxy that records every statement
#       (audit.queries: true)
#   (a") through integration/relayfloor, the bare Go relay, for its floor
#   (b) connection rate: pgbench -C -S, a new connection per transaction,
#       and again through a second credproxy service with server-connection
#       reuse on (pool:), beside PgBouncer's session pooling
#   (c) resident memory per idle session, with 1,000 sessions open
# each direct (the client does SCRAM itself), through credproxy and through
# PgBouncer. PgBouncer is set up as credproxy's peer: session pooling, apps
# connect with no password (auth_type = any), PgBouncer logs in upstream with
# SCRAM using the password from its [databases] entry.
#
# Environment: BENCH_SECONDS (default 20) per pgbench run, BENCH_CLIENTS (8),
# BENCH_JOBS (2), BENCH_IDLE_SESSIONS (1000), BENCH_SCALE (10).
#
# It measures and never judges: the targets are printed beside the figures,
# and the exit status is 0 whenever the runs worked. Everything it starts and
# writes is removed at exit.
set -euo pipefail
umask 077
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps

SECS=${BENCH_SECONDS:-20}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
IDLE=${BENCH_IDLE_SESSIONS:-1000}
SCALE=${BENCH_SCALE:-10}
for v in SECS CLIENTS JOBS IDLE SCALE; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done

# Every idle session is two descriptors in credproxy and one in the client.
ulimit -n "$(ulimit -Hn)"

heading "0. preparing: PostgreSQL, PgBouncer, python3 and bin/credproxy"
bash "$REPO_ROOT/scripts/deps.sh" --bench
pg_init_env
[[ -n $PGBENCH ]] || die "pgbench not found"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[[ -x $PGBOUNCER ]] || die "pgbouncer not found"
build_credproxy
note "$("$CREDPROXY" version); $("$PG_BINDIR/postgres" --version); $("$PGBOUNCER" --version | head -n 1)"
make_workdir credproxy-bench

PG_MAX=$((IDLE + 100))
heading "1. starting PostgreSQL (scram-sha-256, max_connections $PG_MAX) and loading pgbench -i -s $SCALE"
pg_start "$WORK/pg" "$(free_port)" max_connections=$PG_MAX shared_buffers=256MB fsync=off synchronous_commit=off
BENCH_PW=$(random_secret)
printf '%s\n' "$BENCH_PW" >"$WORK/bench.pw"
pg_super <<SQL
CREATE ROLE bench LOGIN PASSWORD '$BENCH_PW';
CREATE DATABASE bench OWNER bench;
SQL
show_log_on_failure "$WORK/pgbench-init.log"
PGPASSWORD=$BENCH_PW "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1 ||
	die "pgbench -i failed"
note "PostgreSQL on 127.0.0.1:$PG_PORT, role bench (SCRAM), scale $SCALE loaded"

heading "2. starting credproxy (static secret, tls disable, audit to a file, queries not recorded)"
PROXY_PORT=$(free_port)
POOL_PORT=$(free_port)
cat >"$WORK/credproxy.yaml" <<YAML
audit:
  path: ./audit.jsonl
  queries: false
secrets:
  bench:
    static:
      username: bench
      password_file: ./bench.pw
postgres:
  - name: bench
    listen: 127.0.0.1:$PROXY_PORT
    upstream: 127.0.0.1:$PG_PORT
    credentials: bench
    tls:
      mode: disable
  - name: bench-pool
    listen: 127.0.0.1:$POOL_PORT
    upstream: 127.0.0.1:$PG_PORT
    credentials: bench
    tls:
      mode: disable
    pool: {max_server_connections: 20, idle_timeout: 60s, max_lifetime: 1h, reset_query: DISCARD ALL}
YAML
start_credproxy "$WORK/credproxy.yaml" "$WORK/credproxy.log" "$PROXY_PORT"
wait_listen "$POOL_PORT" "$CREDPROXY_PID" "credproxy (bench-pool)"
note "credproxy pid $CREDPROXY_PID on 127.0.0.1:$PROXY_PORT, with pool: on 127.0.0.1:$POOL_PORT"
MAIN_PROXY_PID=$CREDPROXY_PID

# The same service in a second process that records every statement.
QUERIES_PORT=$(free_port)
sed -e "s/^  queries: false/  queries: true/" -e "s#./audit.jsonl#./audit-queries.jsonl#" \
	-e "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$QUERIES_PORT/" -e "/^  - name: bench-pool/,\$d" \
	"$WORK/credproxy.yaml" >"$WORK/credproxy-queries.yaml"
start_credproxy "$WORK/credproxy-queries.yaml" "$WORK/credproxy-queries.log" "$QUERIES_PORT"
note "credproxy with audit.queries: true, pid $CREDPROXY_PID on 127.0.0.1:$QUERIES_PORT"
QUERIES_PROXY_PID=$CREDPROXY_PID
CREDPROXY_PID=$MAIN_PROXY_PID

# The floor of a goroutine-per-direction Go relay: no protocol work at all
# (integration/relayfloor). pgbench logs in through it with the password.
FLOOR_PORT=$(free_port)
(cd "$REPO_ROOT" && go build -trimpath -o "$WORK/relayfloor" ./integration/relayfloor) || die "go build relayfloor failed"
"$WORK/relayfloor" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$PG_PORT" 2>>"$WORK/relayfloor.log" &
FLOOR_PID=$!
at_exit stop_pid "$FLOOR_PID"
wait_listen "$FLOOR_PORT" "$FLOOR_PID" relayfloor
note "relayfloor (two read-write goroutines per connection, nothing else) pid $FLOOR_PID on 127.0.0.1:$FLOOR_PORT"

heading "3. starting PgBouncer (session pooling, no client password, SCRAM upstream)"
BOUNCER_PORT=$(free_port)
BDIR=$WORK/pgbouncer
mkdir -p "$BDIR"
cat >"$BDIR/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench user=bench password=$BENCH_PW

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = any
pool_mode = session
max_client_conn = $((IDLE + 100))
default_pool_size = $((IDLE + 50))
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = $BDIR/pgbouncer.log
pidfile = $BDIR/pgbouncer.pid
INI
if is_root; then
	chown -R postgres:postgres "$BDIR" # PgBouncer refuses to run as root
fi
show_log_on_failure "$BDIR/pgbouncer.log"
(cd "$BDIR" && as_pg "$PGBOUNCER" "$BDIR/pgbouncer.ini") >>"$WORK/pgbouncer.stderr" 2>&1 &
bouncer_wrapper=$!
at_exit stop_pid "$bouncer_wrapper"
show_log_on_failure "$WORK/pgbouncer.stderr"
wait_listen "$BOUNCER_PORT" "$bouncer_wrapper" pgbouncer
BOUNCER_PID=$(cat "$BDIR/pgbouncer.pid" 2>/dev/null || true)
if ! [[ $BOUNCER_PID =~ ^[0-9]+$ ]] || ! kill -0 "$BOUNCER_PID" 2>/dev/null; then
	die "cannot find PgBouncer's pid"
fi
at_exit stop_pid "$BOUNCER_PID"
note "pgbouncer pid $BOUNCER_PID on 127.0.0.1:$BOUNCER_PORT"

# The three ways in. Direct: the client does SCRAM itself. The proxies: no
# password at all, any user name.
DIRECT=(-h 127.0.0.1 -p "$PG_PORT" -U bench bench)
VIA_PROXY=(-h 127.0.0.1 -p "$PROXY_PORT" -U anything bench)
VIA_BOUNCER=(-h 127.0.0.1 -p "$BOUNCER_PORT" -U anything bench)
VIA_POOL=(-h 127.0.0.1 -p "$POOL_PORT" -U anything bench)
VIA_QUERIES=(-h 127.0.0.1 -p "$QUERIES_PORT" -U anything bench)
export PGSSLMODE=disable

# Every way must work before anything is measured.
for target in DIRECT VIA_PROXY VIA_BOUNCER VIA_POOL VIA_QUERIES; do
	declare -n args=$target
	pw=()
	[[ $target == DIRECT ]] && pw=(PGPASSWORD="$BENCH_PW")
	env "${pw[@]}" "$PSQL" -X -w -q -At -c 'SELECT count(*) FROM pgbench_branches' \
		"host=${args[1]} port=${args[3]} user=${args[5]} dbname=${args[6]}" >/dev/null ||
		die "cannot query through $target"
	unset -n args
done

# ---------------------------------------------------------------- (c) idle sessions

cat >"$WORK/idle.py" <<'PY'
# Opens N PostgreSQL sessions (StartupMessage, no password, up to
# ReadyForQuery) and holds them idle until SIGTERM; writes READY_FILE when
# all are open.
import signal, socket, struct, sys

host, port, n, user, db, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
conns = []


def recv_exact(s, size):
    buf = b""
    while len(buf) < size:
        chunk = s.recv(size - len(buf))
        if not chunk:
            sys.exit(f"idle: session {len(conns)} closed during startup")
        buf += chunk
    return buf


def start_session():
    s = socket.create_connection((host, port), timeout=30)
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                      (("user", user), ("database", db), ("application_name", "credproxy-bench-idle"))) + b"\0"
    body = struct.pack("!i", 3 << 16) + params
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    while True:
        hdr = recv_exact(s, 5)
        typ, size = hdr[:1], struct.unpack("!i", hdr[1:])[0]
        msg = recv_exact(s, size - 4)
        if typ == b"R" and struct.unpack("!i", msg[:4])[0] != 0:
            sys.exit(f"idle: server asked for authentication (code {struct.unpack('!i', msg[:4])[0]})")
        if typ == b"E":
            fields = {f[:1].decode(): f[1:].decode(errors="replace") for f in msg.split(b"\0") if f}
            sys.exit(f"idle: startup refused: {fields.get('C')} {fields.get('M')}")
        if typ == b"Z":
            s.settimeout(None)
            return s


def stop(*_):
    for s in conns:
        try:
            s.sendall(b"X\0\0\0\x04")
            s.close()
        except OSError:
            pass
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
for _ in range(n):
    conns.append(start_session())
with open(ready, "w") as f:
    f.write(f"{len(conns)}\n")
while True:
    signal.pause()
PY

# idle_rss NAME PID PORT: RSS of PID before and after opening $IDLE idle
# sessions on PORT; sets RSS_BEFORE, RSS_AFTER (KiB).
idle_rss() {
	local name=$1 pid=$2 port=$3 ready=$WORK/idle-$1.ready ipid i
	# One session first, so that one-time start-up allocations are not
	# counted as per-session cost.
	"$PSQL" -X -w -q -At -c 'SELECT 1' "host=127.0.0.1 port=$port user=anything dbname=bench" >/dev/null
	sleep 1
	RSS_BEFORE=$(rss_kib "$pid")
	show_log_on_failure "$WORK/idle-$name.log"
	python3 "$WORK/idle.py" 127.0.0.1 "$port" "$IDLE" anything bench "$ready" 2>>"$WORK/idle-$name.log" &
	ipid=$!
	at_exit stop_pid "$ipid"
	for ((i = 0; i < 1200; i++)); do
		[[ -s $ready ]] && break
		kill -0 "$ipid" 2>/dev/null || die "could not open $IDLE idle sessions through $name"
		sleep 0.1
	done
	[[ -s $ready ]] || die "opening $IDLE idle sessions through $name took over 2 minutes"
	sleep 2
	RSS_AFTER=$(rss_kib "$pid")
	stop_pid "$ipid"
	wait "$ipid" 2>/dev/null || true
	sleep 1 # let the upstream backends go
}

heading "4. (c) memory: $IDLE idle sessions through credproxy, then through PgBouncer"
idle_rss credproxy "$CREDPROXY_PID" "$PROXY_PORT"
CP_RSS0=$RSS_BEFORE CP_RSS1=$RSS_AFTER
note "credproxy: VmRSS $CP_RSS0 KiB -> $CP_RSS1 KiB"
idle_rss pgbouncer "$BOUNCER_PID" "$BOUNCER_PORT"
PB_RSS0=$RSS_BEFORE PB_RSS1=$RSS_AFTER
note "pgbouncer: VmRSS $PB_RSS0 KiB -> $PB_RSS1 KiB"

# ---------------------------------------------------------------- (a), (b) pgbench

# cpu_ticks PID: the process' user+system CPU time so far, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# tps NAME PID ARGS...: runs pgbench, prints its tps; the output is kept in
# pgbench-NAME.log (registered for printing on failure beforehand: tps runs
# in a subshell). With a PID (not -), the CPU time that process spent per
# transaction, in microseconds, goes to cpu-NAME.
tps() {
	local name=$1 pid=$2 out t0 t1
	shift 2
	out=$WORK/pgbench-$name.log
	[[ $pid == - ]] || t0=$(cpu_ticks "$pid")
	"$PGBENCH" -n "$@" >"$out" 2>&1 || die "pgbench $name failed"
	[[ $pid == - ]] || t1=$(cpu_ticks "$pid")
	if [[ $pid != - ]]; then
		awk -v t0="$t0" -v t1="$t1" -v hz="$HZ" '/^number of transactions actually processed:/ { split($NF, a, "/"); n = a[1] }
			END { if (n > 0) printf "%.1f\n", (t1 - t0) / hz / n * 1e6; else print "-" }' "$out" >"$WORK/cpu-$name"
	fi
	awk '/^tps = / { print $3; exit }' "$out"
}
# cpu NAME: what tps NAME wrote.
cpu() { cat "$WORK/cpu-$1"; }

run_three() { # MODE ARGS...: sets T_DIRECT, T_PROXY, T_BOUNCER
	local mode=$1 way
	shift
	for way in direct credproxy pgbouncer; do
		show_log_on_failure "$WORK/pgbench-$mode-$way.log"
	done
	T_DIRECT=$(PGPASSWORD=$BENCH_PW tps "$mode-direct" - "$@" "${DIRECT[@]}")
	note "direct:    $T_DIRECT"
	T_PROXY=$(tps "$mode-credproxy" "$CREDPROXY_PID" "$@" "${VIA_PROXY[@]}")
	note "credproxy: $T_PROXY ($(cpu "$mode-credproxy") µs of credproxy CPU per transaction)"
	T_BOUNCER=$(tps "$mode-pgbouncer" "$BOUNCER_PID" "$@" "${VIA_BOUNCER[@]}")
	note "pgbouncer: $T_BOUNCER ($(cpu "$mode-pgbouncer") µs of PgBouncer CPU per transaction)"
}

heading "5. warming the cache (3 s, not counted)"
show_log_on_failure "$WORK/pgbench-warmup.log"
PGPASSWORD=$BENCH_PW tps warmup - -S -c "$CLIENTS" -j "$JOBS" -T 3 "${DIRECT[@]}" >/dev/null

heading "6. (a) select-only: pgbench -S -c $CLIENTS -j $JOBS -T $SECS, TPS"
run_three select -S -c "$CLIENTS" -j "$JOBS" -T "$SECS"
S_DIRECT=$T_DIRECT S_PROXY=$T_PROXY S_BOUNCER=$T_BOUNCER
show_log_on_failure "$WORK/pgbench-select-credproxy-queries.log"
S_QUERIES=$(tps select-credproxy-queries "$QUERIES_PROXY_PID" -S -c "$CLIENTS" -j "$JOBS" -T "$SECS" "${VIA_QUERIES[@]}")
note "credproxy, audit.queries: true: $S_QUERIES ($(cpu select-credproxy-queries) µs of credproxy CPU per transaction)"
show_log_on_failure "$WORK/pgbench-select-relayfloor.log"
S_FLOOR=$(PGPASSWORD=$BENCH_PW tps select-relayfloor "$FLOOR_PID" -S -c "$CLIENTS" -j "$JOBS" -T "$SECS" -h 127.0.0.1 -p "$FLOOR_PORT" -U bench bench)
note "relayfloor: $S_FLOOR ($(cpu select-relayfloor) µs of relayfloor CPU per transaction)"

heading "7. (b) connection rate: pgbench -C -S -c $CLIENTS -j $JOBS -T $SECS, connections/s"
run_three connect -C -S -c "$CLIENTS" -j "$JOBS" -T "$SECS"
C_DIRECT=$T_DIRECT C_PROXY=$T_PROXY C_BOUNCER=$T_BOUNCER

heading "7b. (b) connection rate with server-connection reuse (pool:): pgbench -C -S -c $CLIENTS -j $JOBS -T $SECS"
show_log_on_failure "$WORK/pgbench-connect-credproxy-pool.log"
C_POOL=$(tps connect-credproxy-pool "$CREDPROXY_PID" -C -S -c "$CLIENTS" -j "$JOBS" -T "$SECS" "${VIA_POOL[@]}")
note "credproxy, pool on: $C_POOL ($(cpu connect-credproxy-pool) µs of credproxy CPU per connection; pgbouncer above: $C_BOUNCER)"

[[ -s $WORK/audit.jsonl ]] || die "credproxy wrote no audit records"
grep -q '"event":"query"' "$WORK/audit-queries.jsonl" || die "credproxy (audit.queries: true) recorded no statements"

# ---------------------------------------------------------------- report

calc() { awk "BEGIN { printf \"$1\", $2 }"; }
verdict() { awk "BEGIN { print (($1) ? \"met\" : \"NOT met\") }"; }

S_RP=$(calc %.2f "$S_PROXY / $S_DIRECT") S_RB=$(calc %.2f "$S_BOUNCER / $S_DIRECT")
S_FLOOR_PB=$(calc %.2f "$S_FLOOR / $S_BOUNCER")
S_PB=$(calc %.2f "$S_PROXY / $S_BOUNCER") S_RQ=$(calc %.2f "$S_QUERIES / $S_DIRECT") S_QB=$(calc %.2f "$S_QUERIES / $S_BOUNCER")
C_RP=$(calc %.2f "$C_PROXY / $C_DIRECT") C_RB=$(calc %.2f "$C_BOUNCER / $C_DIRECT")
C_RPP=$(calc %.2f "$C_POOL / $C_DIRECT") C_PB=$(calc %.2f "$C_POOL / $C_BOUNCER")
CP_PER=$(calc %.1f "($CP_RSS1 - $CP_RSS0) / $IDLE") PB_PER=$(calc %.1f "($PB_RSS1 - $PB_RSS0) / $IDLE")

row() { printf '%-31s %13s %13s %13s %10s %10s   %s\n' "$@"; }
heading "credproxy benchmark: $CLIENTS clients, -j $JOBS, ${SECS}s per run, scale $SCALE, $(nproc) CPUs, $IDLE idle sessions"
row "" direct credproxy pgbouncer "cp/direct" "pb/direct" target
row "(a) select-only TPS (-S)" "$(calc %.0f "$S_DIRECT")" "$(calc %.0f "$S_PROXY")" "$(calc %.0f "$S_BOUNCER")" "${S_RP}x" "${S_RB}x" "credproxy >= 1.1x pgbouncer (${S_PB}x)"
row "(a') the same, audit.queries" "$(calc %.0f "$S_DIRECT")" "$(calc %.0f "$S_QUERIES")" "$(calc %.0f "$S_BOUNCER")" "${S_RQ}x" "${S_RB}x" "credproxy >= 1.0x pgbouncer (${S_QB}x)"
row "(a\") relayfloor (bare Go relay)" "$(calc %.0f "$S_DIRECT")" "$(calc %.0f "$S_FLOOR")" "$(calc %.0f "$S_BOUNCER")" "$(calc %.2f "$S_FLOOR / $S_DIRECT")x" "${S_RB}x" "the floor of a Go relay (${S_FLOOR_PB}x pgbouncer)"
row "(b) connections/s (-C -S)" "$(calc %.0f "$C_DIRECT")" "$(calc %.0f "$C_PROXY")" "$(calc %.0f "$C_BOUNCER")" "${C_RP}x" "${C_RB}x" "credproxy >= 1.7x direct"
row "(b') connections/s, pool: on" "$(calc %.0f "$C_DIRECT")" "$(calc %.0f "$C_POOL")" "$(calc %.0f "$C_BOUNCER")" "${C_RPP}x" "${C_RB}x" "credproxy >= 1.0x pgbouncer (${C_PB}x)"
row "(c) RSS per idle session, KiB" - "$CP_PER" "$PB_PER" "" "" "credproxy <= 32 KiB"
row "    VmRSS before->after, KiB" - "$CP_RSS0->$CP_RSS1" "$PB_RSS0->$PB_RSS1" "" "" ""

heading "CPU per transaction (each proxy's own user+system time; -C rows: per connection)"
row "" "" credproxy pgbouncer "cp/pb" "" ""
cpurow() { # LABEL CREDPROXY-RUN PGBOUNCER-RUN
	local a b
	a=$(cpu "$2") b=$(cpu "$3")
	row "$1" "" "$a µs" "$b µs" "$(calc %.2f "$a / $b")x" "" ""
}
cpurow "(a) select-only" select-credproxy select-pgbouncer
cpurow "(a') the same, audit.queries" select-credproxy-queries select-pgbouncer
cpurow "(a\") relayfloor: bare Go relay" select-relayfloor select-pgbouncer
cpurow "(b) connections (-C -S)" connect-credproxy connect-pgbouncer
cpurow "(b') connections, pool: on" connect-credproxy-pool connect-pgbouncer
note "GOMAXPROCS of credproxy: $(awk -F'"gomaxprocs":' 'NF > 1 { split($2, a, ","); print a[1]; exit }' "$WORK/credproxy.log") (see README, Operating it)"

cat <<EOF

summary
  select-only:      credproxy ${S_PB}x pgbouncer, ${S_RP}x direct   (target >= 1.1x pgbouncer: $(verdict "$S_PB >= 1.1"))
  audit.queries:    credproxy ${S_QB}x pgbouncer, ${S_RQ}x direct   (target >= 1.0x pgbouncer: $(verdict "$S_QB >= 1.0"))
  connection rate:  credproxy ${C_RP}x direct, pgbouncer ${C_RB}x   (target >= 1.7x direct: $(verdict "$C_RP >= 1.7"))
  with pool:        credproxy ${C_RPP}x direct, ${C_PB}x pgbouncer   (target >= 1.0x pgbouncer: $(verdict "$C_PB >= 1.0"))
  idle session RSS: credproxy ${CP_PER} KiB, pgbouncer ${PB_PER} KiB   (target <= 32 KiB: $(verdict "$CP_PER <= 32"))
  (a measurement, not a test: figures vary with the machine and its load)
EOF

# ---------------------------------------------------------------- vault row
# The same pgbench -C through a Vault-backed service (the in-process Vault of
# integration/vaulttest, dynamic database credentials) and a static one, on
# one proxy. The daemons above are idle by now.
heading "(d) Vault dynamic credentials vs static, pgbench -C -S"
out=$(cd "$REPO_ROOT" && CREDPROXY_BENCH=1 BENCH_SECONDS="$SECS" go test -count=1 -run '^TestBenchVaultConnectionRate$' -v ./integration/ 2>&1) ||
	die "vault bench failed:
$out"
grep '^BENCH' <<<"$out" | sed 's/^BENCH /  /'
