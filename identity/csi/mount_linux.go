package csi

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// bindMounter bind-mounts a pod's directory read-only (nosuid, nodev,
// noexec) at the target path. Connecting to a unix socket needs no write
// access to its file system, so the pod's sockets work through it, and
// nothing can be created in the directory from the pod.
type bindMounter struct{}

// A target that already shows dir (the pod's volume, republished to a
// credproxy that restarted) is left as it is: mounting again would stack
// a second mount that the pod's containers never see.
func (bindMounter) Mount(dir, target string) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	if sameDir(dir, target) {
		return nil
	}
	if err := unix.Mount(dir, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount: %w", err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("remount read-only: %w", err)
	}
	return nil
}

// Unmount unmounts target (if mounted) and removes it, as the kubelet
// expects of NodeUnpublishVolume.
func (bindMounter) Unmount(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// sameDir reports whether a and b are the same directory (b a bind mount
// of a).
func sameDir(a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}
