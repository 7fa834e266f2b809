package cache_e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestReplicaKilledMidFetchLeaseTakenOver: the replica holding the Redis
// lease for a blob dies mid-fetch while another replica relays it to its
// own client; once the lease expires that replica takes over, and its
// client gets the whole, correct blob on the same response.
func TestReplicaKilledMidFetchLeaseTakenOver(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 2<<20)
	h.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	lh, _ := layers[0].Digest()
	ld := digest.Digest(lh.String())
	rc, _ := layers[0].Compressed()
	want, _ := io.ReadAll(rc)
	rc.Close()
	redisURL := harness.StartRedis(t)
	shared := filepath.Join(t.TempDir(), "registry")
	args := []string{"--storage-opt", "rootdirectory=" + shared, "--redis-url", redisURL}
	r1 := startCache(t, h, cacheOpts{name: "r1", args: args})
	r2 := startCache(t, h, cacheOpts{name: "r2", args: args})
	h.SetBandwidth(128 << 10) // the fetch would take ~16s: r1 dies long before

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	get := func(c *cacheProc) ([]byte, error) {
		req, _ := http.NewRequestWithContext(ctx, "GET", nsURL(c.url(), "/v2/library/app/blobs/"+ld.String(), h.Host()), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return nil, fmt.Errorf("status %d", resp.StatusCode)
		}
		return io.ReadAll(resp.Body)
	}
	first := make(chan error, 1)
	go func() { _, err := get(r1); first <- err }()
	eventually(t, 10*time.Second, "r1 fetching upstream", func() error {
		if h.BlobGETs(ld) < 1 {
			return fmt.Errorf("no upstream GET yet")
		}
		return nil
	})
	type result struct {
		b   []byte
		err error
	}
	second := make(chan result, 1)
	go func() { b, err := get(r2); second <- result{b, err} }()
	eventually(t, 10*time.Second, "r2 relaying r1's fetch", func() error {
		if v := r2.metric(t, "shoal_flight_relayed_total"); v < 1 {
			return fmt.Errorf("r2 not relaying yet")
		}
		return nil
	})
	start := time.Now()
	r1.kill()
	h.SetBandwidth(0)
	if err := <-first; err == nil {
		t.Fatal("the client of the killed replica got a complete blob")
	}
	res := <-second
	if res.err != nil {
		t.Fatalf("client waiting on r2: %v", res.err)
	}
	if !bytes.Equal(res.b, want) {
		t.Fatalf("client waiting on r2 got %d bytes that differ from the blob", len(res.b))
	}
	if n := h.BlobGETs(ld); n != 2 {
		t.Fatalf("upstream blob GETs = %d, want 2 (the dead fetch and the takeover)", n)
	}
	if n := r2.metric(t, "shoal_flight_lease_takeovers_total"); n < 1 {
		t.Fatalf("r2 reports %v lease takeovers", n)
	}
	// r2's client was streamed r1's bytes (relay) before r1 died; the
	// takeover fetch picked up where the relay broke, with no byte lost.
	if n := r2.metric(t, "shoal_flight_relayed_total"); n != 1 {
		t.Fatalf("r2 relayed %v flights from r1, want 1", n)
	}
	t.Logf("r2 took over %s after r1 was killed", time.Since(start).Round(time.Millisecond))
}
