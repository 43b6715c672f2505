#!/usr/bin/env bash
# make vulncheck: govulncheck against the Go vulnerability database, offline.
#
# This machine reaches the Go module proxy but not vuln.go.dev, so the
# database comes as a module: golang.org/x/vulndb holds every entry as an
# OSV file under data/osv, which govulncheck reads as a local database.
# VULNDB_VERSION picks the snapshot (newer ones are on the proxy; bump it
# to see newer advisories). It fails when the code calls a vulnerable
# function, and reports (without failing) vulnerable code it does not call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GO=${GO:-go}
GOVULNCHECK=${GOVULNCHECK:-golang.org/x/vuln/cmd/govulncheck@v1.9.0}
VULNDB_VERSION=${VULNDB_VERSION:-v0.0.0-20261105234957-e22db6528018}

dir=$("$GO" mod download -json "golang.org/x/vulndb@$VULNDB_VERSION" |
	sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')
[[ -d $dir/data/osv ]] || { echo "vulncheck: no data/osv in golang.org/x/vulndb@$VULNDB_VERSION" >&2; exit 1; }
echo "vulncheck: $("$GO" version | cut -d' ' -f3), database golang.org/x/vulndb@$VULNDB_VERSION ($(ls "$dir/data/osv" | wc -l) entries)"
exec "$GO" run "$GOVULNCHECK" -db "file://$dir/data/osv" ./...
