//go:build linux || darwin

package proxy

import "syscall"

// canCreateIn reports whether this process may create a file in dir.
func canCreateIn(dir string) error {
	const wOK, xOK = 0x2, 0x1 // access(2)'s W_OK and X_OK
	return syscall.Access(dir, wOK|xOK)
}
