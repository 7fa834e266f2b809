// Command pause is the kubelet cluster test's sandbox and app process: it
// waits for SIGTERM or SIGINT and exits 0, as registry.k8s.io/pause does. The
// test builds it statically and packs it into images, for there is no
// registry.k8s.io here. Given files as arguments, it first prints each one's
// sha256 digest ("sha256:<hex> <path>", or "error <path>: ..."), which is how
// the test reads what a pod's image volume holds.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	for _, p := range os.Args[1:] {
		if d, err := digest(p); err != nil {
			fmt.Printf("error %s: %v\n", p, err)
		} else {
			fmt.Printf("sha256:%x %s\n", d, p)
		}
	}
	<-c
}

func digest(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}
