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

.PHONY: build test test-short fuzz integration lint lint-fmt lint-vet lint-staticcheck lint-tidy vulncheck bench demo clean help

build: ## bin/credproxy, versioned by git describe
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/credproxy ./cmd/credproxy

test: ## deps, go vet, every test with -race, then a short run of every fuzz target
	bash scripts/deps.sh
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	$(MAKE) --no-print-directory fuzz

# Every fuzz target `go test -list` finds, fuzzed for FUZZTIME. Crashers
# land in the package's testdata/fuzz.
fuzz: ## FUZZTIME (10s) of every Fuzz* target in the module
	FUZZTIME=$(FUZZTIME) GO=$(GO) bash scripts/fuzz.sh

test-short: ## quick unit tests
	$(GO) test -short ./...

integration: ## end-to-end tests against real daemons
	bash scripts/deps.sh
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

demo: ## credproxy end to end on a throwaway PostgreSQL
	bash scripts/demo.sh

clean: ## remove build output
	rm -rf bin .tmp

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 16
