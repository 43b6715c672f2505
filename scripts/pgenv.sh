#!/usr/bin/env bash
# Makes sure the PostgreSQL server binaries (initdb, postgres) are installed
# and prints their directory, for PG_BINDIR:
#
#   export PG_BINDIR="$(scripts/pgenv.sh)"
#
# Installs Debian's postgresql when they are missing and we are root. Fails,
# never skips: integration tests that quietly do not run prove nothing.
# Progress goes to stderr so that stdout is only the directory.
set -euo pipefail

die() { echo "pgenv: $*" >&2; exit 1; }

# Same search order as integration/pgtest.BinDir. A PG_BINDIR that is set
# but wrong is an error, not a reason to look elsewhere or to install.
if [[ -n "${PG_BINDIR:-}" ]]; then
	[[ -x "$PG_BINDIR/initdb" && -x "$PG_BINDIR/postgres" ]] ||
		die "PG_BINDIR=$PG_BINDIR has no initdb and postgres"
	echo "$PG_BINDIR"
	exit 0
fi

find_bindir() {
	local dir dirs=()
	shopt -s nullglob
	dirs=(/usr/lib/postgresql/*/bin)
	shopt -u nullglob
	if ((${#dirs[@]})); then
		# Highest version first.
		while read -r dir; do
			if [[ -x "$dir/initdb" && -x "$dir/postgres" ]]; then
				echo "$dir"
				return 0
			fi
		done < <(printf '%s\n' "${dirs[@]}" | sort -rV)
	fi
	dir=$(command -v initdb) || return 1
	dir=$(dirname "$dir")
	[[ -x "$dir/postgres" ]] || return 1
	echo "$dir"
}

if dir=$(find_bindir); then
	echo "$dir"
	exit 0
fi

[[ $(id -u) -eq 0 ]] ||
	die "PostgreSQL server binaries not found; as root run: apt-get install -y postgresql postgresql-contrib (or run this script as root)"
command -v apt-get >/dev/null || die "PostgreSQL server binaries not found and apt-get is unavailable to install them"

echo "pgenv: installing postgresql" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update >&2
# postgresql-common first, so that its createcluster.conf can say not to
# create and start the default cluster on 5432: tests run their own servers.
apt-get install -y --no-install-recommends postgresql-common >&2
sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
apt-get install -y --no-install-recommends postgresql postgresql-contrib >&2

dir=$(find_bindir) || die "postgresql installed, yet initdb and postgres are still not found"
echo "$dir"
