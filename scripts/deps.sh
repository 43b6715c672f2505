#!/usr/bin/env bash
# Installs, from Debian's packages, what the tests, the demo and the benchmark
# need when it is missing:
#
#   scripts/deps.sh           PostgreSQL server and client (initdb, postgres,
#                             psql, pgbench): postgresql, postgresql-contrib
#   scripts/deps.sh --bench   the same, plus pgbouncer, python3 and
#                             squid-openssl (Squid with ssl_bump and its
#                             security_file_certgen helper, for bench-http.sh)
#
# Does nothing when everything is there. Installing needs root (or sudo that
# does not ask for a password); otherwise it fails and says what to install.
# It never skips: tests that quietly do not run prove nothing.
set -euo pipefail

die() {
	echo "deps: error: $*" >&2
	exit 1
}

bench=false
for arg in "$@"; do
	case $arg in
	--bench) bench=true ;;
	-h | --help)
		sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument $arg (usage: scripts/deps.sh [--bench])" ;;
	esac
done

have_pg_server() {
	local d
	for d in ${PG_BINDIR:-} /usr/lib/postgresql/*/bin; do
		[[ -x $d/initdb && -x $d/postgres && -x $d/pg_ctl ]] && return 0
	done
	command -v initdb >/dev/null && command -v pg_ctl >/dev/null
}

have_pg_client() {
	local d
	for d in ${PG_BINDIR:-} /usr/lib/postgresql/*/bin; do
		[[ -x $d/psql && -x $d/pgbench ]] && return 0
	done
	command -v psql >/dev/null && command -v pgbench >/dev/null
}

have_pgbouncer() { command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]]; }

# Squid built with OpenSSL (ssl_bump): Debian's squid-openssl, which ships
# the certificate generator helper next to it.
have_squid_openssl() {
	[[ -x /usr/sbin/squid && -x /usr/lib/squid/security_file_certgen ]] &&
		/usr/sbin/squid -v 2>/dev/null | grep -q -- '--with-openssl'
}

packages=()
if ! have_pg_server || ! have_pg_client; then
	packages+=(postgresql postgresql-contrib)
fi
# curl: the demo scrapes /metrics with it, and the HTTP proxy tests drive it.
command -v curl >/dev/null || packages+=(curl ca-certificates)
if $bench; then
	have_pgbouncer || packages+=(pgbouncer)
	command -v python3 >/dev/null || packages+=(python3)
	have_squid_openssl || packages+=(squid-openssl)
fi
((${#packages[@]})) || exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then
	if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		sudo=(sudo -n)
	else
		die "missing ${packages[*]}; as root run: apt-get update && apt-get install -y ${packages[*]}"
	fi
fi
command -v apt-get >/dev/null || die "missing ${packages[*]} and apt-get is not available to install them"

echo "deps: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive

# Packages must not start their own daemons (Debian's default cluster on
# 5432, pgbouncer on 6432, squid on 3128): the scripts start private ones on
# free ports.
added_policy=false
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
	"${sudo[@]}" chmod 0755 /usr/sbin/policy-rc.d
	added_policy=true
fi
cleanup() {
	if $added_policy; then
		"${sudo[@]}" rm -f /usr/sbin/policy-rc.d
	fi
}
trap cleanup EXIT

"${sudo[@]}" apt-get update >&2 || die "apt-get update failed"
if [[ " ${packages[*]} " == *" postgresql "* ]]; then
	# postgresql-common first, so that its createcluster.conf can say not to
	# create the default cluster at all.
	"${sudo[@]}" apt-get install -y --no-install-recommends postgresql-common >&2 ||
		die "apt-get install postgresql-common failed"
	"${sudo[@]}" sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
		/etc/postgresql-common/createcluster.conf
fi
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}" >&2 ||
	die "apt-get install ${packages[*]} failed"

have_pg_server || die "postgresql installed, yet initdb, pg_ctl and postgres are still not found"
have_pg_client || die "postgresql installed, yet psql and pgbench are still not found"
if $bench; then
	have_pgbouncer || die "pgbouncer installed, yet not found"
	have_squid_openssl || die "squid-openssl installed, yet /usr/sbin/squid with OpenSSL or security_file_certgen is not found"
fi
echo "deps: ok" >&2
