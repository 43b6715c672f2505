// Command relayfloor is the cheapest relay of credproxy's structure: per
// connection, a dial and two goroutines, each a plain read-then-write
// loop over one buffer, with no protocol work at all. (Not io.Copy: between
// two TCP connections that splices through a pipe, other system calls
// than credproxy's.) make bench runs pgbench through it beside credproxy: the gap
// between the two is what credproxy's own work costs, and what is left
// between it and PgBouncer is the runtime's (netpoller, goroutine
// hand-offs), which a relay with this structure cannot shed.
//
// Usage: relayfloor LISTEN-ADDR UPSTREAM-ADDR
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: relayfloor LISTEN-ADDR UPSTREAM-ADDR")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go relay(c, os.Args[2])
	}
}

func relay(c net.Conn, upstream string) {
	defer c.Close()
	u, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	defer u.Close()
	go func() {
		pipe(u, c)
		u.Close()
	}()
	pipe(c, u)
}

// pipe copies src to dst until either fails.
func pipe(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
