# credproxy. `make` builds bin/credproxy; `make help` lists the targets.

SHELL       := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

GO          ?= go
# The Go toolchain everything builds and tests with: 1.26.10 fixes
# net/http and crypto/x509 vulnerabilities of the 1.26.8 a machine may start
# with. The go command fetches it from the module proxy once. GO_TOOLCHAIN=local
# uses whatever go is on PATH.
GO_TOOLCHAIN ?= go1.26.10
export GOTOOLCHAIN := $(GO_TOOLCHAIN)
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -X main.version=$(VERSION)
FUZZTIME    ?= 10s
# staticcheck 2026.2.2; the release that supports the Go version in go.mod.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

# Go files to format-check: everything but VCS data, scratch and test data.
GOFILES = $(shell find . -name '*.go' -not -path './.git/*' -not -path './.tmp/*' -not -path '*/testdata/*' -not -path './vendor/*')

.PHONY: build test test-short fuzz integration kube-bins lint lint-fmt lint-vet lint-staticcheck lint-tidy vulncheck bench bench-http demo clean help

build: ## bin/credproxy, versioned by git describe
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/credproxy ./cmd/credproxy

# The packages whose tests run a Kubernetes API server (they import
# integration/kubetest), and the others.
KUBE_PKGS = $(shell $(GO) list -f '{{.ImportPath}}{{range .TestImports}} {{.}}{{end}}{{range .XTestImports}} {{.}}{{end}}' ./... | \
	grep -w 'github.com/credproxy/credproxy/integration/kubetest' | cut -d' ' -f1)
OTHER_PKGS = $(filter-out $(KUBE_PKGS),$(shell $(GO) list ./...))

# scripts/kube-bins.sh takes minutes on a fresh machine (it compiles
# kube-apiserver) and a fraction of a second once cached: it runs beside vet
# and the tests that do not need its binaries, using the cores they leave idle
# (the integration tests mostly wait on daemons); the tests that do need them
# run after it.
test: ## deps, go vet, every test with -race (kube-apiserver and etcd built meanwhile), then a short run of every fuzz target
	bash scripts/deps.sh
	@mkdir -p .tmp
	@bash scripts/kube-bins.sh >.tmp/kube-bins.log 2>&1 & kube_bins=$$!; \
	rc=0; $(GO) vet ./... && $(GO) test -race -count=1 -timeout 20m $(OTHER_PKGS) || rc=$$?; \
	wait $$kube_bins || { cat .tmp/kube-bins.log; echo "scripts/kube-bins.sh failed" >&2; exit 1; }; \
	cat .tmp/kube-bins.log; exit $$rc
	$(GO) test -race -count=1 -timeout 20m $(KUBE_PKGS)
	$(MAKE) --no-print-directory fuzz

# Every fuzz target `go test -list` finds, fuzzed for FUZZTIME. Crashers
# land in the package's testdata/fuzz.
fuzz: ## FUZZTIME (10s) of every Fuzz* target in the module
	FUZZTIME=$(FUZZTIME) GO=$(GO) bash scripts/fuzz.sh

# Cached by version outside the tree (see the script); make clean leaves it.
kube-bins: ## build (or find cached) the kube-apiserver and etcd that integration/kubetest runs
	bash scripts/kube-bins.sh

test-short: ## quick unit tests
	$(GO) test -short ./...

integration: ## end-to-end tests against real daemons
	bash scripts/deps.sh
	bash scripts/kube-bins.sh >/dev/null
	$(GO) test -race -count=1 ./integration/...

# `make -k lint` reports every check's findings, not only the first.
lint: lint-fmt lint-vet lint-staticcheck lint-tidy ## gofmt, go vet, staticcheck, go.mod tidy

lint-fmt:
	@out=$$(gofmt -l $(GOFILES)); \
	if [[ -n $$out ]]; then echo "gofmt -l: these files need gofmt -w:"; echo "$$out"; exit 1; fi

lint-vet:
	$(GO) vet ./...

lint-staticcheck:
	$(GO) run $(STATICCHECK) ./...

# go mod tidy, then fail on any change to go.mod or go.sum: -diff does both
# without writing, so it works on a work tree with uncommitted edits.
lint-tidy:
	$(GO) mod tidy -diff

vulncheck: ## govulncheck against a pinned snapshot of the Go vulnerability database (VULNDB_VERSION)
	GO=$(GO) bash scripts/vulncheck.sh

bench: ## Postgres: direct vs credproxy vs PgBouncer, Vault row; HTTPS: direct vs bin/credproxy vs Squid ssl_bump (BENCH_SECONDS)
	bash scripts/bench.sh
	bash scripts/bench-http.sh

bench-http: ## HTTPS only: direct vs bin/credproxy vs Squid ssl_bump, one run (BENCH_SECONDS, BENCH_PROFILE, BENCH_PROXY_GOMAXPROCS)
	bash scripts/bench-http.sh

demo: ## credproxy end to end on this machine: PostgreSQL, HTTP, and Vault when vault or bao is installed
	bash scripts/demo.sh

clean: ## remove build output
	rm -rf bin .tmp

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 16
