#!/usr/bin/env bash
# bench-http.sh: HTTPS through credproxy's interception proxy (the built
# binary, bin/credproxy) against the same requests made directly and
# through Squid with ssl_bump, on one local HTTPS upstream, in one run.
#
# One run prints one table: requests/s, p50 and p99 latency, the ratio to
# direct, the p50 overhead, each proxy's CPU time per request and whether
# the credential reached the upstream; then the first request on a new
# client connection (CONNECT, interception certificate, both TLS
# handshakes) to a new host and to one seen before; then issue 12's
# targets beside the figures.
#
# The load generator is scripts/benchhttp (Go net/http, keep-alive): the
# same client for all three ways, and for the proxies it does what an
# HTTPS_PROXY app does: CONNECT, then TLS to the upstream inside the tunnel,
# verifying the proxy's certificate. (wrk cannot: it has no proxy support,
# and it starts TLS on the TCP connection itself, before any CONNECT.) The
# ways take turns in short rounds, so that whatever else the machine does
# weighs on all of them alike. The upstream is benchhttp too (a separate
# process, HTTP/1.1 over TLS 1.3, ECDSA P-256), on 127.0.0.1 and the next
# BENCH_NEW_HOSTS loopback addresses, so that "new host" requests reach it
# without DNS.
#
#   credproxy  a route per upstream address, header injection from a static
#              secret, audit to a file (as deployed), default settings.
#   Squid      Debian's squid-openssl: ssl_bump bump for the upstream (peek
#              at the ClientHello first, so the generated certificate mimics
#              the upstream's, SANs included), certificates from a CA of
#              its own via security_file_certgen (db in the work dir), no
#              caching, access log to a file, run as the proxy user when
#              started as root. It injects nothing.
#
# Environment: BENCH_SECONDS (default 10) measured per way, BENCH_ROUNDS (5)
# it is split into, BENCH_CLIENTS (8) concurrent keep-alive clients,
# BENCH_NEW_HOSTS (20) first requests timed per way, BENCH_BODY (256)
# response bytes. BENCH_PROFILE=DIR builds credproxy with -tags pprof and
# writes its CPU and allocation profiles of the run to DIR (cpu.pprof,
# allocs.pprof; `go tool pprof bin/credproxy-pprof DIR/cpu.pprof`).
# BENCH_PROXY_GOMAXPROCS=N runs credproxy (only) with GOMAXPROCS=N, as a
# sidecar under a CPU limit would be (unset: the Go runtime's default);
# Squid runs one worker, a single thread, whatever it is.
#
# It measures and never judges: the targets are printed beside the figures
# and the exit status is 0 whenever the runs worked. Everything it starts
# and writes (but BENCH_PROFILE's files) is removed at exit.
set -euo pipefail
umask 077
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps

SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-5}
CLIENTS=${BENCH_CLIENTS:-8}
NEW_HOSTS=${BENCH_NEW_HOSTS:-20}
BODY=${BENCH_BODY:-256}
for v in SECS ROUNDS CLIENTS NEW_HOSTS BODY; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
((NEW_HOSTS <= 250)) || die "BENCH_NEW_HOSTS must be at most 250 (loopback addresses 127.0.0.2 on)"
PROFILE=${BENCH_PROFILE:-}
PROXY_PROCS=${BENCH_PROXY_GOMAXPROCS:-}
[[ -z $PROXY_PROCS || $PROXY_PROCS =~ ^[1-9][0-9]*$ ]] || die "BENCH_PROXY_GOMAXPROCS must be a positive integer, not '$PROXY_PROCS'"

heading "0. preparing: Squid (squid-openssl), bin/credproxy, the load generator"
bash "$REPO_ROOT/scripts/deps.sh" --bench
SQUID=/usr/sbin/squid
CERTGEN=/usr/lib/squid/security_file_certgen
[[ -x $SQUID && -x $CERTGEN ]] || die "squid-openssl not found (scripts/deps.sh --bench installs it)"
build_credproxy
if [[ -n $PROFILE ]]; then
	mkdir -p "$PROFILE"
	PROFILE=$(cd "$PROFILE" && pwd)
	(cd "$REPO_ROOT" && go build -trimpath -tags pprof -o bin/credproxy-pprof ./cmd/credproxy) || die "go build -tags pprof failed"
	CREDPROXY=$REPO_ROOT/bin/credproxy-pprof
	export CREDPROXY_CPUPROFILE=$PROFILE/cpu.pprof CREDPROXY_MEMPROFILE=$PROFILE/allocs.pprof
fi
make_workdir credproxy-benchhttp
BENCHHTTP=$WORK/benchhttp
(cd "$REPO_ROOT" && go build -trimpath -o "$BENCHHTTP" ./scripts/benchhttp) || die "go build ./scripts/benchhttp failed"
note "$("$CREDPROXY" version); $("$SQUID" -v | head -n 1); $(go version)"

heading "1. starting the upstream (HTTPS, HTTP/1.1, $BODY-byte responses) on 127.0.0.1 and 127.0.0.2-$((NEW_HOSTS + 1))"
UP_PORT=$(free_port)
mkdir -p "$WORK/up"
show_log_on_failure "$WORK/up/upstream.log"
"$BENCHHTTP" upstream -listen "127.0.0.1:$UP_PORT" -hosts $((NEW_HOSTS + 1)) -dir "$WORK/up" -body "$BODY" 2>"$WORK/up/upstream.log" &
UP_PID=$!
at_exit stop_pid "$UP_PID"
wait_listen "$UP_PORT" "$UP_PID" upstream
UPSTREAM_CA=$WORK/up/ca.pem
note "upstream pid $UP_PID on port $UP_PORT; its CA in $UPSTREAM_CA"

heading "2. starting credproxy (header injection, static secret, audit to a file)"
CP_PORT=$(free_port)
mkdir -p "$WORK/cp"
"$CREDPROXY" ca init --out "$WORK/cp/ca" >/dev/null
{
	cat <<YAML
audit:
  path: ./audit.jsonl
secrets:
  bench:
    static:
      token: $(random_secret)
http:
  listen: 127.0.0.1:$CP_PORT
  ca:
    cert_file: ./ca/ca.pem
    key_file: ./ca/ca-key.pem
  upstream_ca_file: $UPSTREAM_CA
  routes:
YAML
	for ((i = 1; i <= NEW_HOSTS + 1; i++)); do
		cat <<YAML
    - host: 127.0.0.$i:$UP_PORT
      credentials: bench
      inject:
        header:
          name: Authorization
          value: "Bearer {{ .token }}"
YAML
	done
} >"$WORK/cp/credproxy.yaml"
if [[ -n $PROXY_PROCS ]]; then
	GOMAXPROCS=$PROXY_PROCS start_credproxy "$WORK/cp/credproxy.yaml" "$WORK/cp/credproxy.log" "$CP_PORT"
else
	start_credproxy "$WORK/cp/credproxy.yaml" "$WORK/cp/credproxy.log" "$CP_PORT"
fi
note "credproxy pid $CREDPROXY_PID on 127.0.0.1:$CP_PORT ($((NEW_HOSTS + 1)) routes), GOMAXPROCS ${PROXY_PROCS:-default}"

heading "3. starting Squid (ssl_bump bump for the upstream, its own CA, no cache)"
SQ_PORT=$(free_port)
SQ=$WORK/squid
mkdir -p "$SQ"
"$CREDPROXY" ca init --out "$SQ/ca" >/dev/null # an ECDSA P-256 CA, as credproxy's
cp "$UPSTREAM_CA" "$SQ/upstream-ca.pem"
squid_user=()
if is_root; then
	# Squid drops root for cache_effective_user; its files must be that user's.
	id proxy >/dev/null 2>&1 || die "running as root needs the 'proxy' system user (apt-get install squid-openssl creates it)"
	squid_user=(runuser -u proxy --)
	echo "cache_effective_user proxy" >"$SQ/user.conf"
else
	: >"$SQ/user.conf"
fi
cat >"$SQ/squid.conf" <<CONF
include $SQ/user.conf
http_port 127.0.0.1:$SQ_PORT ssl-bump tls-cert=$SQ/ca/ca.pem tls-key=$SQ/ca/ca-key.pem generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program $CERTGEN -s $SQ/ssl_db -M 16MB
sslcrtd_children 4 startup=1 idle=1
tls_outgoing_options cafile=$SQ/upstream-ca.pem

acl step1 at_step SslBump1
acl bench_upstream dst 127.0.0.0/8
ssl_bump peek step1
ssl_bump bump bench_upstream
ssl_bump terminate all

acl bench_clients src 127.0.0.1/32
http_access allow bench_clients
http_access deny all

cache deny all
cache_mem 0
access_log stdio:$SQ/access.log
cache_log $SQ/cache.log
pid_filename $SQ/squid.pid
coredump_dir $SQ
shutdown_lifetime 1 seconds
CONF
if is_root; then
	chown -R proxy:proxy "$SQ"
fi
"${squid_user[@]}" "$CERTGEN" -c -s "$SQ/ssl_db" -M 16MB >/dev/null
"$SQUID" -k parse -f "$SQ/squid.conf" >"$SQ/parse.log" 2>&1 || die "squid.conf does not parse: $(cat "$SQ/parse.log")"
show_log_on_failure "$SQ/cache.log"
show_log_on_failure "$SQ/squid.stderr"
"$SQUID" -N -f "$SQ/squid.conf" >"$SQ/squid.stderr" 2>&1 &
SQUID_PID=$!
at_exit stop_pid "$SQUID_PID"
wait_listen "$SQ_PORT" "$SQUID_PID" squid
note "squid pid $SQUID_PID on 127.0.0.1:$SQ_PORT"

heading "4. the load: direct, credproxy, Squid; $CLIENTS clients, ${SECS}s each in $ROUNDS rounds"
read -r load1 load5 _ </proc/loadavg
"$BENCHHTTP" load -url "https://127.0.0.1:$UP_PORT/x" \
	-new-host-url "https://127.0.0.%d:$UP_PORT/first" -new-hosts "$NEW_HOSTS" \
	-duration "${SECS}s" -rounds "$ROUNDS" -concurrency "$CLIENTS" -upstream-pid "$UP_PID" \
	-note "machine: $(nproc) CPUs, load average $load1 (1 min) $load5 (5 min) before the run; load generator, proxies and upstream share them; $BODY-byte responses" \
	-via "direct=-,$UPSTREAM_CA" \
	-via "credproxy=http://127.0.0.1:$CP_PORT,$WORK/cp/ca/ca.pem,$CREDPROXY_PID" \
	-via "squid=http://127.0.0.1:$SQ_PORT,$SQ/ca/ca.pem,$SQUID_PID"

[[ -s $WORK/cp/audit.jsonl ]] || die "credproxy wrote no audit records"
if [[ -n $PROFILE ]]; then
	stop_pid "$CREDPROXY_PID"
	note "profiles of credproxy: $PROFILE/cpu.pprof, $PROFILE/allocs.pprof (binary: bin/credproxy-pprof)"
fi
