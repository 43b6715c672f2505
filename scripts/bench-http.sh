#!/usr/bin/env bash
# bench-http.sh: credproxy's HTTP forward proxy against direct requests.
#
# One run prints one table: requests/s and p50/p99 latency for plain HTTP
# and for intercepted HTTPS, each direct and through credproxy with header
# injection; the proxied/direct ratio; the warm p50 overhead; and the time
# of the first request to a new host (CONNECT, interception certificate
# minted, both TLS handshakes, the upstream request).
#
# The load generator is scripts/benchhttp (Go): wrk cannot send HTTPS
# through a forward proxy. It starts the proxy in-process (httpproxy.Proxy
# with a static credential and an audit file), two loopback upstreams
# (HTTP and HTTPS) and keep-alive clients; nothing is left behind.
#
# Environment: BENCH_SECONDS (default 10) per scenario, BENCH_CLIENTS (8)
# concurrent keep-alive clients, BENCH_NEW_HOSTS (50) first requests timed.
# Extra arguments go to benchhttp (see `go run ./scripts/benchhttp -h`), e.g.
# -audit=false to leave the audit file out, -body 4096, -rounds 10.
#
# It measures and never judges: targets are printed beside the figures and
# the exit status is 0 whenever the runs worked.
set -euo pipefail
umask 077
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECS=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-8}
NEW_HOSTS=${BENCH_NEW_HOSTS:-50}
for v in SECS CLIENTS NEW_HOSTS; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || {
		echo "bench-http.sh: $v must be a positive integer, not '${!v}'" >&2
		exit 1
	}
done
command -v go >/dev/null || {
	echo "bench-http.sh: go is required" >&2
	exit 1
}

bin=$(mktemp -d "${TMPDIR:-/tmp}/credproxy-benchhttp.XXXXXX")
trap 'rm -rf "$bin"' EXIT
go build -trimpath -o "$bin/benchhttp" ./scripts/benchhttp
"$bin/benchhttp" -duration "${SECS}s" -concurrency "$CLIENTS" -new-hosts "$NEW_HOSTS" "$@"
