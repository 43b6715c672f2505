# shellcheck shell=bash
# Shared helpers for scripts/demo.sh and scripts/bench.sh. Source it after
# `set -euo pipefail`; it defines functions and variables and runs nothing.
#
# What it gives:
#   - output: heading, note, die
#   - cleanup: setup_traps, at_exit CMD ARGS..., show_log_on_failure FILE
#   - ports and processes: free_port, wait_listen, stop_pid, rss_kib
#   - a throwaway PostgreSQL: pg_init_env, pg_start, pg_super
#   - credproxy: build_credproxy, start_credproxy
#
# PostgreSQL refuses to run as root, so when the script runs as root the
# server (and PgBouncer) run as the `postgres` system user, in directories
# that user owns; otherwise they run as the invoking user.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename "$0")

# ---------------------------------------------------------------- output

if [[ -t 1 ]]; then
	_B=$'\033[1m' _N=$'\033[0m'
else
	_B='' _N=''
fi

# heading TEXT: a numbered step, in bold on a terminal.
heading() { printf '\n%s%s%s\n' "$_B" "$*" "$_N"; }

# note TEXT: an indented explanation under a heading.
note() { printf '   %s\n' "$*"; }

die() {
	printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
	exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# ---------------------------------------------------------------- cleanup

_CLEANUPS=()
_FAILURE_LOGS=()

# at_exit CMD ARGS...: run CMD ARGS at exit, last registered first.
at_exit() { _CLEANUPS+=("$(printf '%q ' "$@")"); }

# show_log_on_failure FILE: print the tail of FILE when the script fails.
show_log_on_failure() { _FAILURE_LOGS+=("$1"); }

_on_exit() {
	local rc=$? i log
	set +e
	trap - EXIT INT TERM
	if ((rc != 0)); then
		for log in "${_FAILURE_LOGS[@]}"; do
			[[ -s $log ]] || continue
			printf '\n---- last lines of %s ----\n' "$log" >&2
			tail -n 40 "$log" >&2
		done
	fi
	for ((i = ${#_CLEANUPS[@]} - 1; i >= 0; i--)); do
		eval "${_CLEANUPS[i]}"
	done
	exit "$rc"
}

setup_traps() {
	trap _on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
}

# make_workdir PREFIX: a private temporary directory, removed at exit; sets WORK.
make_workdir() {
	if is_root; then
		# The postgres user must be able to reach its own subdirectories.
		WORK=$(mktemp -d "/tmp/$1.XXXXXX")
		chmod 0711 "$WORK"
	else
		WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
	fi
	at_exit rm -rf "$WORK"
	# No password from a file either. An empty regular file rather than
	# /dev/null, which libpq reads too but warns about.
	: >"$WORK/empty.pgpass"
	export PGPASSFILE=$WORK/empty.pgpass
}

# random_secret: 32 random alphanumeric characters.
random_secret() { head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-32; }

# ---------------------------------------------------------------- ports, processes

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
	if command -v python3 >/dev/null; then
		python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
		return
	fi
	local p
	for _ in $(seq 100); do
		p=$((20000 + RANDOM % 40000))
		is_listening "$p" || {
			echo "$p"
			return
		}
	done
	die "no free port found"
}

# is_listening PORT: a TCP socket listens on PORT (read from /proc, so that
# no probe connection shows up in anyone's logs).
is_listening() {
	local hex f files=()
	hex=$(printf ':%04X' "$1")
	for f in /proc/net/tcp /proc/net/tcp6; do
		[[ -r $f ]] && files+=("$f")
	done
	awk -v p="$hex" 'FNR > 1 && substr($2, length($2) - 4) == p && $4 == "0A" { found = 1 } END { exit !found }' "${files[@]}"
}

# wait_listen PORT PID WHAT [SECONDS]: wait until PORT listens, failing if
# process PID dies first or the time runs out.
wait_listen() {
	local port=$1 pid=$2 what=$3 secs=${4:-30} i
	for ((i = 0; i < secs * 10; i++)); do
		is_listening "$port" && return 0
		kill -0 "$pid" 2>/dev/null || die "$what (pid $pid) exited before listening on port $port"
		sleep 0.1
	done
	die "$what (pid $pid) is not listening on port $port after ${secs}s"
}

# stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 15).
stop_pid() {
	local pid=$1 secs=${2:-15} i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < secs * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}

# rss_kib PID: resident set size of PID in KiB (VmRSS).
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# ---------------------------------------------------------------- PostgreSQL

# pg_init_env: finds the PostgreSQL binaries; sets PG_BINDIR, PSQL, PGBENCH.
# scripts/deps.sh has installed them when they were missing.
pg_init_env() {
	if [[ -z ${PG_BINDIR:-} ]]; then
		if [[ -x $REPO_ROOT/scripts/pgenv.sh ]]; then
			PG_BINDIR=$("$REPO_ROOT/scripts/pgenv.sh")
		else
			local d
			PG_BINDIR=
			for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
				if [[ -x $d/initdb && -x $d/postgres ]]; then
					PG_BINDIR=$d
					break
				fi
			done
		fi
	fi
	[[ -n $PG_BINDIR && -x $PG_BINDIR/initdb && -x $PG_BINDIR/pg_ctl ]] ||
		die "PostgreSQL server binaries not found (run scripts/deps.sh as root, or set PG_BINDIR)"
	PSQL=$PG_BINDIR/psql
	[[ -x $PSQL ]] || PSQL=$(command -v psql) || die "psql not found"
	PGBENCH=$PG_BINDIR/pgbench
	[[ -x $PGBENCH ]] || PGBENCH=$(command -v pgbench) || PGBENCH=
	if is_root; then
		id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' system user (apt-get install postgresql creates it)"
	fi
	# Nothing from the caller's environment may change where psql connects
	# or let it find a password on its own (make_workdir sets PGPASSFILE).
	unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGSERVICEFILE PGSSLMODE PGOPTIONS
	export PGCONNECT_TIMEOUT=10
}

# as_pg CMD ARGS...: run as the PostgreSQL OS user (postgres when we are root).
as_pg() {
	if is_root; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# pg_start DIR PORT [SETTING=VALUE ...]: initdb a throwaway cluster in DIR
# that accepts only scram-sha-256 over TCP on 127.0.0.1:PORT, start it, and
# stop it at exit. Sets PG_PORT and PG_SUPERPW (superuser "postgres").
pg_start() {
	local dir=$1 port=$2 kv
	shift 2
	PG_PORT=$port
	PG_SUPERPW=$(random_secret)
	mkdir -p "$dir"
	printf '%s\n' "$PG_SUPERPW" >"$dir/superuser.pw"
	if is_root; then
		chown -R postgres:postgres "$dir"
	fi
	chmod 0700 "$dir"
	show_log_on_failure "$dir/initdb.log"
	(cd "$dir" && as_pg "$PG_BINDIR/initdb" -D "$dir/data" -U postgres \
		--auth=scram-sha-256 --pwfile="$dir/superuser.pw" \
		--encoding=UTF8 --locale=C --no-sync --no-instructions) >"$dir/initdb.log" 2>&1 ||
		die "initdb failed (see above)"
	rm -f "$dir/superuser.pw"
	{
		echo "listen_addresses = '127.0.0.1'"
		echo "port = $port"
		echo "unix_socket_directories = ''"
		echo "password_encryption = 'scram-sha-256'"
		for kv in "$@"; do
			echo "${kv%%=*} = ${kv#*=}"
		done
	} >>"$dir/data/postgresql.conf"
	echo 'host all all 127.0.0.1/32 scram-sha-256' >"$dir/data/pg_hba.conf"
	show_log_on_failure "$dir/postgres.log"
	at_exit _pg_stop "$dir"
	(cd "$dir" && as_pg "$PG_BINDIR/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start) >/dev/null ||
		die "PostgreSQL did not start (see above)"
}

_pg_stop() {
	local dir=$1
	[[ -f $dir/data/postmaster.pid ]] || return 0
	(cd "$dir" && as_pg "$PG_BINDIR/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop) >/dev/null 2>&1 ||
		(cd "$dir" && as_pg "$PG_BINDIR/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop) >/dev/null 2>&1 || true
}

# pg_super ARGS...: psql as the superuser, straight to the server.
pg_super() {
	PGPASSWORD=$PG_SUPERPW "$PSQL" -X -q -w -v ON_ERROR_STOP=1 \
		"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres sslmode=disable" "$@"
}

# ---------------------------------------------------------------- credproxy

# build_credproxy: go build bin/credproxy as `make build` does; sets CREDPROXY.
build_credproxy() {
	local version
	command -v go >/dev/null || die "go is not installed"
	version=$(git -C "$REPO_ROOT" describe --tags --always --dirty 2>/dev/null || echo dev)
	(cd "$REPO_ROOT" && go build -trimpath -ldflags "-X main.version=$version" -o bin/credproxy ./cmd/credproxy) ||
		die "go build failed"
	CREDPROXY=$REPO_ROOT/bin/credproxy
}

# start_credproxy CONFIG LOG PORT: start credproxy in the background (stopped
# at exit), wait for its listener; sets CREDPROXY_PID.
start_credproxy() {
	local cfg=$1 log=$2 port=$3
	"$CREDPROXY" validate --config "$cfg" >/dev/null 2>>"$log" || die "invalid credproxy config $cfg: $(cat "$log")"
	show_log_on_failure "$log"
	"$CREDPROXY" run --config "$cfg" 2>>"$log" &
	CREDPROXY_PID=$!
	at_exit stop_pid "$CREDPROXY_PID"
	wait_listen "$port" "$CREDPROXY_PID" credproxy
}
