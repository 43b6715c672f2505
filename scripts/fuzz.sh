#!/usr/bin/env bash
# Runs every fuzz target in the module for FUZZTIME (default 10s) each.
# Targets are found with `go test -list '^Fuzz'`, as the go command sees
# them (build tags, generated files), not by grepping sources. Crashers
# land in the package's testdata/fuzz and fail the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10s}

# `go test -list` prints each package's matching names, then its "ok" line.
targets=$("$GO" test -list '^Fuzz' ./... | awk '
	/^Fuzz[A-Za-z0-9_]*$/ { names[n++] = $1; next }
	/^ok[ \t]/ { for (i = 0; i < n; i++) print $2, names[i]; n = 0 }
')
found=0
while read -r pkg name; do
	[[ -n $pkg ]] || continue
	found=$((found + 1))
	echo "fuzz: $pkg $name for $FUZZTIME"
	"$GO" test -run='^$' -fuzz="^$name\$" -fuzztime="$FUZZTIME" "$pkg"
done <<<"$targets"
echo "fuzz: $found targets fuzzed"
((found > 0)) || { echo "fuzz: no fuzz targets found" >&2; exit 1; }
