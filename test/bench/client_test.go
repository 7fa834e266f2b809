package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// discard hides io.Discard's ReaderFrom so that io.CopyBuffer uses our
// 1 MiB buffer: the client reads in large chunks for every contender.
type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// newClient is the one HTTP client every throughput contender is read with.
func newClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableCompression: true,
		MaxIdleConns:       16,
		IdleConnTimeout:    30 * time.Second,
		ReadBufferSize:     1 << 20,
	}}
}

// download GETs url, reads the body to nothing with a 1 MiB buffer, checks
// the length, and returns the throughput in MiB/s.
func download(c *http.Client, url string, want int64) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	n, err := io.CopyBuffer(discard{}, resp.Body, make([]byte, 1<<20))
	if err != nil {
		return 0, fmt.Errorf("GET %s: body after %d bytes: %w", url, n, err)
	}
	if n != want {
		return 0, fmt.Errorf("GET %s: %d bytes, want %d", url, n, want)
	}
	return float64(n) / (1 << 20) / time.Since(start).Seconds(), nil
}

// head sends HEAD url and returns the status.
func head(c *http.Client, url string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}
