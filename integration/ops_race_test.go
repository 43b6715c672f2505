//go:build race

package integration

// opsRace is true when the tests run with -race; the credproxy binary the
// ops tests start is then built with -race too, so that a data race in the
// signal, reload and shutdown paths fails the test that provoked it.
const opsRace = true
