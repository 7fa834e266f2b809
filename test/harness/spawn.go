package harness

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

// Spawn starts cmd and stops it in t.Cleanup: it sends stop (SIGTERM,
// SIGQUIT, os.Interrupt: whatever the program shuts down on), then
// SIGKILLs it after grace. The returned channel closes once the process has
// exited. Cleanups the caller registers after Spawn run before the stop.
func Spawn(t testing.TB, cmd *exec.Cmd, stop os.Signal, grace time.Duration) (<-chan struct{}, error) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(stop)
		select {
		case <-done:
		case <-time.After(grace):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return done, nil
}
