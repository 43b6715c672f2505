//go:build !linux

package csi

import "errors"

type bindMounter struct{}

func (bindMounter) Mount(dir, target string) error { return errors.New("csi: bind mounts need Linux") }
func (bindMounter) Unmount(target string) error    { return errors.New("csi: bind mounts need Linux") }
