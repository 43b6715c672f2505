//go:build !pprof

package main

// startProfiles profiles nothing: only a binary built with -tags pprof
// does (profile_on.go).
func startProfiles() (stop func()) { return func() {} }
