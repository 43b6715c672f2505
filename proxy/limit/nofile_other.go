//go:build !unix

package limit

// OpenFileLimit is a conservative guess where the limit cannot be read.
func OpenFileLimit() int { return fallback }
