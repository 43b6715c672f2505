#!/usr/bin/env bash
# Builds the kube-apiserver and etcd that integration/kubetest runs, from the
# versions pinned in scripts/kubebins/go.mod, through the Go module proxy, and
# puts beside them the CRDs the deploy tests install (crds/: the Prometheus
# Operator's PodMonitor, from its Go module):
#
#   scripts/kube-bins.sh           build unless already cached; print the directory
#
# The binaries go to $KUBE_BINDIR if set, else to
#   ${XDG_CACHE_HOME:-$HOME/.cache}/credproxy/kube/kubernetes-<version>-etcd-<version>/
# which is where kubetest looks for them (it honours KUBE_BINDIR too). A stamp
# there records what they were built from (go.mod, go.sum, the build command,
# the CRDs' source), so a later run returns at once, and a change to any of
# those rebuilds.
#
# A cold build compiles all of kube-apiserver from source: about 15 minutes of
# CPU time, minutes of wall time on 2 cores (see the timing it prints). It
# never skips: kubetest fails, naming this script, when the binaries are missing.
set -euo pipefail

die() {
	echo "kube-bins: error: $*" >&2
	exit 1
}

for arg in "$@"; do
	case $arg in
	-h | --help)
		sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument $arg (usage: scripts/kube-bins.sh)" ;;
	esac
done

# The Prometheus Operator release whose PodMonitor CRD the chart's PodMonitor
# is checked against.
prometheus_operator=github.com/prometheus-operator/prometheus-operator@v0.85.0
podmonitor_crd=example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mod=$root/scripts/kubebins
command -v go >/dev/null || die "go not found on PATH"
command -v flock >/dev/null || die "flock (util-linux) not found"

# The build module stands alone: no workspace, and none of the caller's GOFLAGS.
export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0

version_of() { (cd "$mod" && go list -m -f '{{.Version}}' "$1"); }
kube_version=$(version_of k8s.io/kubernetes) || die "cannot read the k8s.io/kubernetes version from $mod/go.mod"
etcd_version=$(version_of go.etcd.io/etcd/server/v3) || die "cannot read the etcd version from $mod/go.mod"
[[ $kube_version =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || die "k8s.io/kubernetes $kube_version is not a v1.MINOR.PATCH release"
kube_minor=${BASH_REMATCH[1]}

# One go build for both: they share most of their dependencies (gRPC, the
# etcd client, protobuf), which are then compiled once.
kpkg=k8s.io/component-base/version
ldflags="-s -w -X $kpkg.gitVersion=$kube_version -X $kpkg.gitMajor=1 -X $kpkg.gitMinor=$kube_minor -X $kpkg.gitTreeState=clean"
# -gcflags=all=-N -l: no optimization, no inlining. The compile is the cost
# on a fresh machine (CI): this cuts it by a fifth (631 against about 800
# CPU-seconds measured here), and a test API server has no need of speed.
build=(go build -trimpath -gcflags=all=-N\ -l -ldflags "$ldflags")
pkgs=(k8s.io/kubernetes/cmd/kube-apiserver go.etcd.io/etcd/server/v3)

dir=${KUBE_BINDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/credproxy/kube/kubernetes-$kube_version-etcd-$etcd_version}
# What the output depends on, and nothing else: editing a comment here must
# not cost a rebuild.
stamp=$({
	cat "$mod/go.mod" "$mod/go.sum"
	echo "CGO_ENABLED=$CGO_ENABLED ${build[*]} ${pkgs[*]}"
	echo "$prometheus_operator $podmonitor_crd"
} | sha256sum | cut -d' ' -f1)

cached() {
	[[ -x $dir/kube-apiserver && -x $dir/etcd && -f $dir/crds/${podmonitor_crd##*/} &&
		-f $dir/stamp && $(<"$dir/stamp") == "$stamp" ]]
}

mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9 # another run may be building the same versions: wait for it
if cached; then
	echo "kube-bins: kube-apiserver $kube_version and etcd $etcd_version cached in $dir" >&2
	echo "$dir"
	exit 0
fi

echo "kube-bins: building kube-apiserver $kube_version and etcd $etcd_version into $dir (minutes when cold)" >&2
rm -f "$dir/stamp"
tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
(cd "$mod" && go mod download) || die "go mod download failed in $mod"
downloaded=$SECONDS
(cd "$mod" && "${build[@]}" -o "$tmp/" "${pkgs[@]}") || die "go build failed in $mod"
mv "$tmp/server" "$tmp/etcd" # the main package of go.etcd.io/etcd/server/v3 builds as "server"

# Read each whole answer before matching it: grep -q stops reading at its
# match, and under pipefail the writer's SIGPIPE would fail the check.
kube_says=$("$tmp/kube-apiserver" --version) || die "kube-apiserver --version failed"
grep -qx "Kubernetes $kube_version" <<<"$kube_says" ||
	die "the kube-apiserver built says $kube_says, want Kubernetes $kube_version"
etcd_says=$("$tmp/etcd" --version) || die "etcd --version failed"
grep -q "^etcd Version: ${etcd_version#v}\$" <<<"$etcd_says" ||
	die "the etcd built says ${etcd_says%%$'\n'*}, want ${etcd_version#v}"

crd_src=$(cd "$tmp" && go mod download -json "$prometheus_operator" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[[ -f $crd_src/$podmonitor_crd ]] || die "$prometheus_operator has no $podmonitor_crd"
mkdir -p "$tmp/crds"
install -m 0644 "$crd_src/$podmonitor_crd" "$tmp/crds/"

rm -rf "$dir/crds"
mv -f "$tmp/kube-apiserver" "$tmp/etcd" "$tmp/crds" "$dir/"
echo "$stamp" >"$dir/stamp" # last: it marks the pair complete
echo "kube-bins: built in $((SECONDS - start))s ($((downloaded - start))s of it downloading modules) into $dir" >&2
echo "$dir"
