package cache_e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// replicaPair is the setup of the tests in which one replica fetches a blob
// while another waits on its lease: a hub holding one 2 MiB layer, served
// slowly, a Redis, and two replicas on shared storage and that Redis.
type replicaPair struct {
	h      *hub.Hub
	r1, r2 *cacheProc
	ld     digest.Digest
	want   []byte
}

// sharedStorage is where both replicas of a pair store: flags and the
// environment that carries credentials.
type sharedStorage struct {
	args, env []string
}

// fsStorage is one filesystem directory that both replicas use.
func fsStorage(t *testing.T) sharedStorage {
	return sharedStorage{args: []string{"--storage-opt", "rootdirectory=" + filepath.Join(t.TempDir(), "registry")}}
}

// s3Storage is a bucket on a fresh SeaweedFS server.
func s3Storage(t *testing.T) sharedStorage {
	s3 := harness.StartS3(t)
	return sharedStorage{args: s3.CacheArgs(), env: s3.CacheEnv()}
}

// startReplicaPair starts the pair on filesystem storage; the hub sends
// bandwidth bytes a second and the replicas get the extra flags.
func startReplicaPair(t *testing.T, bandwidth int64, extra ...string) *replicaPair {
	return startReplicaPairOn(t, fsStorage(t), bandwidth, extra...)
}

// startReplicaPairOn is startReplicaPair on the given storage.
func startReplicaPairOn(t *testing.T, st sharedStorage, bandwidth int64, extra ...string) *replicaPair {
	t.Helper()
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 2<<20)
	h.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	lh, _ := layers[0].Digest()
	ld := hub.DigestOf(lh)
	rd := harness.StartRedisServer(t)
	args := append(append(st.args, "--redis-url", rd.URL), extra...)
	p := &replicaPair{h: h, ld: ld, want: imageContent(t, img)[ld],
		r1: startCache(t, h, cacheOpts{name: "r1", args: args, env: st.env}),
		r2: startCache(t, h, cacheOpts{name: "r2", args: args, env: st.env})}
	h.SetBandwidth(bandwidth)
	return p
}

func (p *replicaPair) blobURL(c *cacheProc) string {
	return nsURL(c.url(), "/v2/library/app/blobs/"+p.ld.String(), p.h.Host())
}

// fetched is what one client got.
type fetched struct {
	b   []byte
	err error
}

// fetch GETs the blob through c in the background.
func (p *replicaPair) fetch(ctx context.Context, c *cacheProc) <-chan fetched {
	out := make(chan fetched, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", p.blobURL(c), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			out <- fetched{err: err}
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			out <- fetched{err: fmt.Errorf("status %d", resp.StatusCode)}
			return
		}
		b, err := io.ReadAll(resp.Body)
		out <- fetched{b, err}
	}()
	return out
}

// r1Fetches starts a client on r1 and waits until upstream sees its fetch.
func (p *replicaPair) r1Fetches(t *testing.T, ctx context.Context) <-chan fetched {
	t.Helper()
	first := p.fetch(ctx, p.r1)
	eventually(t, 10*time.Second, "r1 fetching upstream", func() error {
		if p.h.BlobGETs(p.ld) < 1 {
			return fmt.Errorf("no upstream GET yet")
		}
		return nil
	})
	return first
}

// r2Relays starts a client on r2 and waits until r2 relays r1's fetch.
func (p *replicaPair) r2Relays(t *testing.T, ctx context.Context) <-chan fetched {
	t.Helper()
	second := p.fetch(ctx, p.r2)
	eventually(t, 10*time.Second, "r2 relaying r1's fetch", func() error {
		if v := p.r2.metric(t, "shoal_flight_relayed_total"); v < 1 {
			return fmt.Errorf("r2 not relaying yet")
		}
		return nil
	})
	return second
}

// TestReplicaKilledMidFetchLeaseTakenOver: the replica holding the Redis
// lease for a blob dies mid-fetch while another replica relays it to its
// own client; once the lease expires that replica takes over, and its
// client gets the whole, correct blob on the same response. It runs on a
// shared directory and on a real S3 bucket (SeaweedFS).
func TestReplicaKilledMidFetchLeaseTakenOver(t *testing.T) {
	t.Run("filesystem", func(t *testing.T) { testReplicaKilledMidFetch(t, fsStorage(t)) })
	t.Run("s3", func(t *testing.T) { testReplicaKilledMidFetch(t, s3Storage(t)) })
}

func testReplicaKilledMidFetch(t *testing.T, st sharedStorage) {
	p := startReplicaPairOn(t, st, 128<<10) // the fetch would take ~16s: r1 dies long before
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	first := p.r1Fetches(t, ctx)
	second := p.r2Relays(t, ctx)
	start := time.Now()
	p.r1.kill()
	p.h.SetBandwidth(0)
	if res := <-first; res.err == nil {
		t.Fatal("the client of the killed replica got a complete blob")
	}
	res := <-second
	if res.err != nil || !bytes.Equal(res.b, p.want) {
		t.Fatalf("client waiting on r2: %d bytes, %v; want the whole blob", len(res.b), res.err)
	}
	if n := p.h.BlobGETs(p.ld); n != 2 {
		t.Fatalf("upstream blob GETs = %d, want 2 (the dead fetch and the takeover)", n)
	}
	if n := p.r2.metric(t, "shoal_flight_lease_takeovers_total"); n < 1 {
		t.Fatalf("r2 reports %v lease takeovers", n)
	}
	// r2's client was streamed r1's bytes (relay) before r1 died; the
	// takeover fetch picked up where the relay broke, with no byte lost.
	if n := p.r2.metric(t, "shoal_flight_relayed_total"); n != 1 {
		t.Fatalf("r2 relayed %v flights from r1, want 1", n)
	}
	t.Logf("r2 took over %s after r1 was killed", time.Since(start).Round(time.Millisecond))
}

// TestReplicaStoppedMidFetch_PullsComplete: the replica that holds a blob's
// lease is frozen (SIGSTOP) mid-fetch while another replica relays it to its
// client. The relay stalls, the idle timeout ends it, the lease expires
// (nothing renews it), the other replica takes over, and its client gets
// the whole blob on the same response.
func TestReplicaStoppedMidFetch_PullsComplete(t *testing.T) {
	p := startReplicaPair(t, 256<<10, "--upstream-idle-timeout", "2s")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	p.r1Fetches(t, ctx)
	second := p.r2Relays(t, ctx)
	if err := syscall.Kill(p.r1.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(p.r1.PID(), syscall.SIGCONT) })
	p.h.SetBandwidth(0)
	res := <-second
	if res.err != nil || !bytes.Equal(res.b, p.want) {
		t.Fatalf("client of r2 with r1 frozen: %d bytes, %v; want the whole blob", len(res.b), res.err)
	}
	if n := p.r2.metric(t, "shoal_flight_lease_takeovers_total"); n < 1 {
		t.Fatalf("r2 reports %v lease takeovers", n)
	}
}

// TestWaitingReplica_StreamsFromLeaseHolder: while r1 holds the lease and
// fetches a slow blob, a client of r2 gets its headers and bytes as they
// arrive (r2 relays from r1), not silence until r1 commits: a node's
// header timeout never turns the wait into a 404. Upstream sees one GET.
func TestWaitingReplica_StreamsFromLeaseHolder(t *testing.T) {
	p := startReplicaPair(t, 256<<10) // ~8s for the layer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	first := p.r1Fetches(t, ctx)
	req, _ := http.NewRequestWithContext(ctx, "GET", p.blobURL(p.r2), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET through r2: %v", err)
	}
	defer resp.Body.Close()
	select {
	case res := <-first:
		t.Fatalf("r2 sent its headers only after r1's fetch ended (%v): it waited in silence", res.err)
	default:
	}
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(p.want)) {
		t.Fatalf("r2: status %d, Content-Length %d; want 200 and %d", resp.StatusCode, resp.ContentLength, len(p.want))
	}
	got, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(got, p.want) {
		t.Fatalf("r2 body: %d bytes, %v; want the blob", len(got), err)
	}
	if res := <-first; res.err != nil || !bytes.Equal(res.b, p.want) {
		t.Fatalf("r1's client: %d bytes, %v", len(res.b), res.err)
	}
	if n := p.h.BlobGETs(p.ld); n != 1 {
		t.Errorf("upstream GETs of the blob = %d, want 1", n)
	}
	if v := p.r2.metric(t, "shoal_flight_relayed_total"); v != 1 {
		t.Errorf("r2 shoal_flight_relayed_total = %v, want 1", v)
	}
}
