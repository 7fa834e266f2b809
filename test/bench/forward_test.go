package bench

import (
	"io"
	"net"
	"sync"
	"testing"
)

// startForwarder runs a bare TCP forwarder to target on a loopback port and
// returns its address. Go's io.Copy between two *net.TCPConn moves the bytes
// by splice(2), so this is the cheapest possible extra hop: the ceiling any
// relay can reach on this machine.
func startForwarder(b *testing.B, target string) string {
	return startForwarderCopy(b, target, io.Copy)
}

// startUserspaceForwarder is the same hop through a 32 KiB user-space buffer
// loop (the writer and reader are wrapped so io.Copy cannot use splice): how
// a relay that copies through user space performs, side by side.
func startUserspaceForwarder(b *testing.B, target string) string {
	return startForwarderCopy(b, target, func(dst io.Writer, src io.Reader) (int64, error) {
		return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 32<<10))
	})
}

func startForwarderCopy(b *testing.B, target string, copyFn func(io.Writer, io.Reader) (int64, error)) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{})
				go func() {
					_, _ = copyFn(u, c)
					u.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				_, _ = copyFn(c, u)
				c.(*net.TCPConn).CloseWrite()
				<-done
			})
		}
	})
	return ln.Addr().String()
}
