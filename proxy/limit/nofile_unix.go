//go:build unix

package limit

import "syscall"

// OpenFileLimit is the process's soft RLIMIT_NOFILE (which the Go runtime
// raises to the hard limit at start), or fallback when it cannot be read.
func OpenFileLimit() int {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil || r.Cur == 0 {
		return fallback
	}
	if r.Cur > 1<<30 {
		return 1 << 30 // RLIM_INFINITY and the like
	}
	return int(r.Cur)
}
