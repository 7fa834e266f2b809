package cache_e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// s3Replicas starts n cache replicas that store in one SeaweedFS bucket and
// share one Redis; every replica maps docker.io to the hub, so all clients
// pull under one registry name.
func s3Replicas(t *testing.T, h *hub.Hub, s3 *harness.S3, redisURL string, prefix string, n int, extra ...string) []*cacheProc {
	t.Helper()
	var rs []*cacheProc
	for i := range n {
		args := append(append(s3.CacheArgs(), "--redis-url", redisURL), extra...)
		rs = append(rs, startCache(t, h, cacheOpts{name: fmt.Sprintf("%s%d", prefix, i), upstreams: []string{"docker.io=" + h.URL()},
			args: args, env: s3.CacheEnv()}))
	}
	return rs
}

// TestS3ReplicasColdPullsFetchOnce: three replicas on one real S3 bucket
// (SeaweedFS) and one Redis. 32 concurrent cold pulls of a four-layer image,
// spread over all replicas and made by crane, regctl, go-containerregistry
// and containerd through shoal nodes, cost exactly one upstream GET per blob
// and one counted manifest GET. Then every replica is replaced by a new
// process with an empty data dir: the image is served from S3 with not one
// request upstream.
func TestS3ReplicasColdPullsFetchOnce(t *testing.T) {
	bin := requireShoal(t)
	s3 := harness.StartS3(t)
	h := hub.Start(t)
	img := harness.RandomImage(t, 4, 1<<20)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	redisURL := harness.StartRedis(t)
	replicas := s3Replicas(t, h, s3, redisURL, "r", 3)

	// Two containerd sites, each behind its own node, each node on its own
	// replica; the nodes have no peers, so every byte comes from the cache.
	var sites []*site
	for i := range 2 {
		ctrd := harness.StartContainerd(t, harness.ContainerdV2)
		node := harness.StartShoalNode(t, harness.NodeOptions{
			Bin: bin, Name: fmt.Sprintf("n%d", i), Containerd: ctrd,
			Registries: []string{"docker.io"}, Args: []string{"--cache-url", replicas[i].url()},
		})
		writeHostsTOML(t, ctrd, "docker.io", node.URL())
		sites = append(sites, &site{name: node.Name, ctrd: ctrd, node: node})
	}
	clis := []string{"crane", "regctl"}
	for _, tool := range clis {
		_ = harness.Binary(t, "SHOAL_"+map[string]string{"crane": "CRANE", "regctl": "REGCTL"}[tool]+"_BIN", tool)
	}
	h.ResetCounts()
	h.SetBandwidth(2 << 20) // each layer takes about half a second: the pulls overlap

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const clients = 32
	errs := make([]error, clients)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			c := replicas[i%len(replicas)]
			switch {
			case i < len(sites):
				s := sites[i]
				if out, err := s.ctrd.CtrErr("images", "pull", "--hosts-dir", s.ctrd.CertsDir, "docker.io/library/app:v1"); err != nil {
					errs[i] = fmt.Errorf("containerd on %s: %w\n%s", s.name, err, out)
				}
			case i < len(sites)+3*len(clis): // three of each real client
				errs[i] = cliPull(t, ctx, clis[(i-len(sites))%len(clis)], c.addr, "library/app", "v1", want)
			default:
				got, err := ggcrPull(ctx, c.addr, "library/app", "v1", "")
				if err == nil {
					err = want.same(got)
				}
				errs[i] = err
			}
		}()
	}
	close(start)
	wg.Wait()
	h.SetBandwidth(0)
	for i, err := range errs {
		if err != nil {
			t.Errorf("client %d (replica %s): %v", i, replicas[i%len(replicas)].name, err)
		}
	}
	for _, s := range sites {
		requireContainerdContent(t, s, want)
	}
	for d := range want {
		if d == md {
			continue
		}
		if n := h.BlobGETs(d); n != 1 {
			t.Errorf("blob %s: %d upstream GETs, want exactly 1", d, n)
		}
	}
	if n := h.Counts().ManifestGET; n != 1 {
		t.Errorf("counted manifest GETs = %d, want exactly 1", n)
	}
	for _, c := range replicas {
		if v := c.metric(t, "shoal_cache_requests_total"); v < 1 {
			t.Errorf("replica %s served no request: the pulls were not spread", c.name)
		}
	}
	if t.Failed() {
		return
	}

	// Replace every replica: a new process, an empty data dir, the same
	// bucket and Redis. Within the tag freshness window nothing goes upstream.
	for _, c := range replicas {
		c.stop()
	}
	h.ResetCounts()
	fresh := s3Replicas(t, h, s3, redisURL, "fresh", 3)
	for _, c := range fresh {
		got, err := ggcrPull(ctx, c.addr, "library/app", "v1", "")
		if err == nil {
			err = want.same(got)
		}
		if err != nil {
			t.Fatalf("pull from restarted replica %s: %v", c.name, err)
		}
	}
	if n := h.Counts().Requests; n != 0 {
		t.Errorf("restarted replicas sent %d requests upstream (%+v), want 0", n, h.Counts())
	}
}

// TestS3EvictionAcrossReplicas: two replicas on one S3 bucket and one
// Redis, a --max-size of 4.5 blobs. Eviction follows the uses of both
// replicas: the blob replica B served last is kept though replica A stored
// it and never served it again, and a blob that B is in the middle of
// serving is kept though it is the least recently requested. The layers of
// a cached manifest are never evicted. What is evicted costs exactly one
// upstream GET when asked for again; what is kept costs none.
func TestS3EvictionAcrossReplicas(t *testing.T) {
	requireShoal(t)
	const unit = 8 << 20 // larger than a loopback socket's buffers, so a slow client holds its response open
	s3 := harness.StartS3(t)
	h := hub.Start(t)
	imgA := harness.RandomImage(t, 2, unit)
	h.Push(t, "library/a", "v1", imgA)
	wantA := imageContent(t, imgA)
	imgB := harness.RandomImage(t, 4, unit)
	h.Push(t, "library/b", "v1", imgB)
	var b []digest.Digest // blobs no cached manifest references: B's layers, fetched alone
	layers, err := imgB.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, digest.Digest(d.String()))
	}
	rs := s3Replicas(t, h, s3, harness.StartRedis(t), "e", 2,
		"--max-size", strconv.Itoa(4*unit+unit/2), "--evict-interval", "200ms", "--evict-grace", "1s")
	r0, r1 := rs[0], rs[1]
	get := func(c *cacheProc, d digest.Digest) {
		t.Helper()
		resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/b/blobs/"+d.String(), "docker.io"))
		if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != d {
			t.Fatalf("GET %s from %s: %d, %d bytes", d, c.name, resp.StatusCode, len(body))
		}
	}
	evicted := func() float64 {
		return r0.metric(t, "shoal_cache_evicted_blobs_total") + r1.metric(t, "shoal_cache_evicted_blobs_total")
	}
	waitEvicted := func(n float64) {
		t.Helper()
		eventually(t, time.Minute, fmt.Sprintf("%v blobs evicted", n), func() error {
			if v := evicted(); v != n {
				return fmt.Errorf("%v evicted", v)
			}
			return nil
		})
	}
	// A replica commits a fetched blob to S3 after its client has it all;
	// the order of uses below needs the commits done. The last pass, on
	// whichever replica ran it, says what the storage holds.
	waitStored := func(n int64) {
		t.Helper()
		eventually(t, time.Minute, fmt.Sprintf("%d bytes stored", n), func() error {
			if v := max(r0.metric(t, "shoal_cache_storage_bytes"), r1.metric(t, "shoal_cache_storage_bytes")); v < float64(n) {
				return fmt.Errorf("%v bytes stored", v)
			}
			return nil
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// 4 blobs stored: A's two layers (referenced), b0 and b1 by r0.
	get(r0, b[0])
	get(r0, b[1])
	if got, err := ggcrPull(ctx, r1.addr, "library/a", "v1", ""); err != nil || wantA.same(got) != nil {
		t.Fatalf("pull a via %s: %v", r1.name, err)
	}
	waitStored(4 * unit)
	// r1 serves b0 again, then stores b2: 5 blobs, over the bound. The
	// least recently used unreferenced blob is b1, whatever r1 alone saw.
	get(r1, b[0])
	get(r1, b[2])
	waitEvicted(1)
	h.ResetCounts()
	get(r0, b[0])
	get(r1, b[2])
	if got, err := ggcrPull(ctx, r0.addr, "library/a", "v1", ""); err != nil || wantA.same(got) != nil {
		t.Fatalf("pull a via %s: %v", r0.name, err)
	}
	if n := h.Counts().Requests; n != 0 {
		t.Fatalf("after the first eviction, the kept blobs and image cost %d upstream requests (%+v), want 0", n, h.Counts())
	}
	if v := evicted(); v != 1 {
		t.Fatalf("%v blobs evicted, want 1: 4 blobs fit", v)
	}

	// r1 starts serving b0 to a client that reads slowly. r0 then serves
	// b2 and stores b3: over the bound again. By request times b0 is the
	// least recent, but it is being served, so b2 goes.
	slow := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{Control: smallReceiveBuffer}).DialContext}}
	req, err := http.NewRequestWithContext(ctx, "GET", nsURL(r1.url(), "/v2/library/b/blobs/"+b[0].String(), "docker.io"), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := slow.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("slow GET of b0: %v %v", resp, err)
	}
	defer resp.Body.Close()
	head := make([]byte, 1024)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatal(err)
	}
	get(r0, b[2])
	get(r0, b[3]) // its commit takes it over the bound
	waitEvicted(2)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || digest.FromBytes(append(head, rest...)) != b[0] {
		t.Fatalf("the slow client's b0: %d bytes, %v; want the whole blob", len(head)+len(rest), err)
	}
	h.ResetCounts()
	get(r1, b[0])
	if got, err := ggcrPull(ctx, r1.addr, "library/a", "v1", ""); err != nil || wantA.same(got) != nil {
		t.Fatalf("pull a via %s: %v", r1.name, err)
	}
	if n := h.Counts().Requests; n != 0 {
		t.Fatalf("b0 and image a cost %d upstream requests (%+v), want 0: they were kept", n, h.Counts())
	}
	for _, d := range []digest.Digest{b[1], b[2]} {
		get(r0, d)
		if n := h.BlobGETs(d); n != 1 {
			t.Errorf("blob %s, evicted: %d upstream GETs when asked again, want 1", d, n)
		}
	}
}

// smallReceiveBuffer sets a socket's receive buffer to 32 KiB, so that a
// client that does not read stops the server's writes.
func smallReceiveBuffer(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10) })
	return errors.Join(err, serr)
}
