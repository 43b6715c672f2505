package main

import (
	"math"
	"os"
	"runtime"

	"go.uber.org/automaxprocs/maxprocs"
)

// How credproxy chooses GOMAXPROCS (README, "Operating it").
//
// Go's own default follows the cgroup CPU limit but never goes below 2.
// credproxy's work is nearly all system calls and goroutine hand-offs, so
// under a limit of one CPU or less (the usual sidecar: 100m–1000m) a
// second P buys no parallelism, only thread wake-ups, spinning and
// context switches paid from the same quota: `make bench` measured about
// 10% more select-only transactions and 14% more pooled connections per
// second with GOMAXPROCS=1 under a 0.5-CPU quota. Above one CPU, and
// with no limit, the runtime's default stands, and keeps following
// changes to the limit. The GOMAXPROCS environment variable overrides
// both.
const (
	maxProcsFromEnv     = "env"       // $GOMAXPROCS
	maxProcsOneCPU      = "cpu_limit" // a cgroup CPU limit of one CPU or less
	maxProcsRuntime     = "runtime"   // Go's default: the CPUs, or the limit rounded up, at least 2
	maxProcsUnavailable = "runtime (cgroup limit unreadable)"
)

// chooseMaxProcs is the decision: env is $GOMAXPROCS, quota the cgroup
// CPU limit in CPUs when hasQuota. It returns the value to set, or 0 to
// keep (or go back to) the runtime's default, and why.
func chooseMaxProcs(env string, quota float64, hasQuota bool) (procs int, why string) {
	switch {
	case env != "":
		return 0, maxProcsFromEnv
	case hasQuota && quota <= 1:
		return 1, maxProcsOneCPU
	}
	return 0, maxProcsRuntime
}

// setMaxProcs applies chooseMaxProcs at start and returns GOMAXPROCS,
// why, and the cgroup CPU limit (0 when there is none).
func setMaxProcs() (procs int, why string, limit float64) {
	env := os.Getenv("GOMAXPROCS")
	if env != "" {
		return runtime.GOMAXPROCS(0), maxProcsFromEnv, 0
	}
	// automaxprocs finds the process' cgroup (v1 or v2) and its quota;
	// its rounding function is where the quota is seen. It sets
	// GOMAXPROCS itself, which stops the runtime following the limit,
	// so anything but the one-CPU case goes back to the runtime default.
	var hasQuota bool
	_, err := maxprocs.Set(maxprocs.Logger(func(string, ...any) {}), maxprocs.RoundQuotaFunc(func(q float64) int {
		limit, hasQuota = q, true
		return max(1, int(math.Ceil(q)))
	}))
	n, why := chooseMaxProcs(env, limit, hasQuota)
	if n > 0 {
		runtime.GOMAXPROCS(n)
		return n, why, limit
	}
	runtime.SetDefaultGOMAXPROCS()
	if err != nil {
		why = maxProcsUnavailable
	}
	return runtime.GOMAXPROCS(0), why, limit
}
