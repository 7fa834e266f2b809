package cache_e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// s3Replicas starts n cache replicas that store in one SeaweedFS bucket and
// share one Redis; every replica maps docker.io to the hub, so all clients
// pull under one registry name.
func s3Replicas(t *testing.T, h *hub.Hub, s3 *harness.S3, redisURL string, prefix string, n int) []*cacheProc {
	t.Helper()
	var rs []*cacheProc
	for i := range n {
		rs = append(rs, startCache(t, h, cacheOpts{name: fmt.Sprintf("%s%d", prefix, i), upstreams: []string{"docker.io=" + h.URL()},
			args: append(s3.CacheArgs(), "--redis-url", redisURL), env: s3.CacheEnv()}))
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
