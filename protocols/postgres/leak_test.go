package postgres

import (
	"testing"

	"go.uber.org/goleak"
)

// Every session goroutine has an owner: none may outlive the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
