package harness

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"
)

// Request sends method to url with headers (name, value, ...) and returns
// the response with its body read (at most 64 MiB), failing the test on a
// transport error.
func Request(t testing.TB, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	resp, body, err := RequestErr(method, url, hdr...)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp, body
}

// RequestErr is Request returning an error instead of failing the test.
func RequestErr(method, url string, hdr ...string) (*http.Response, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, nil, err
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return resp, body, err
}

// Eventually retries f every 100ms until it returns nil, and fails the test
// with f's last error once timeout has passed.
func Eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
