//go:build pprof

package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
)

// startProfiles, in a binary built with -tags pprof (scripts/bench-http.sh
// with BENCH_PROFILE), writes a CPU profile of the whole run to
// $CREDPROXY_CPUPROFILE and, at exit, the allocation profile to
// $CREDPROXY_MEMPROFILE. A normal build has neither (profile_off.go).
func startProfiles() (stop func()) {
	cpuPath, memPath := os.Getenv("CREDPROXY_CPUPROFILE"), os.Getenv("CREDPROXY_MEMPROFILE")
	var cpu *os.File
	if cpuPath != "" {
		f, err := os.Create(cpuPath)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "credproxy: CPU profile:", err)
		} else {
			cpu = f
		}
	}
	return func() {
		if cpu != nil {
			pprof.StopCPUProfile()
			cpu.Close()
		}
		if memPath == "" {
			return
		}
		f, err := os.Create(memPath)
		if err == nil {
			runtime.GC()
			err = pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "credproxy: allocation profile:", err)
		}
	}
}
