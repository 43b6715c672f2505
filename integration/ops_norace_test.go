//go:build !race

package integration

// opsRace: see ops_race_test.go.
const opsRace = false
