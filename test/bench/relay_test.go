package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/node"
	"github.com/shoal-oci/shoal/node/routing"
	layoutstore "github.com/shoal-oci/shoal/node/store/layout"
)

// inProcessNode runs a node.Node on a loopback listener in this process,
// with an in-memory router on net, serving the OCI layout at dir.
func inProcessNode(b *testing.B, mem *routing.MemoryNetwork, id, dir string) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	base := "http://" + ln.Addr().String()
	st, err := layoutstore.New(dir)
	if err != nil {
		b.Fatal(err)
	}
	nd, err := node.New(node.Config{Store: st, Router: mem.Node(routing.Peer{ID: id, Addr: base}), Registries: []string{"docker.io"}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _ = nd.Run(ctx) }()
	srv := &http.Server{Handler: nd, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(func() {
		cancel()
		_ = srv.Close()
	})
	waitFor(b, 10*time.Second, "node "+id+" ready", func() error {
		if !nd.Ready() {
			return fmt.Errorf("not ready")
		}
		return nil
	})
	return base
}

// BenchmarkRelayInProcess measures the peer-hop path without processes or
// the DHT: two node.Node handlers in this process on loopback, sharing an
// in-memory router. It compares a blob (256 MiB; SHOAL_BENCH_RELAY_MIB) read
// from the holder A (local, sendfile) with the same blob read through B (one
// relay hop), in interleaved rounds. Run it with -cpuprofile to see where
// the relay spends its time:
//
//	go test -run '^$' -bench RelayInProcess -benchtime 1x -cpuprofile cpu.out ./test/bench/
//	go tool pprof -top test/bench/bench.test cpu.out
func BenchmarkRelayInProcess(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	size := int64(envInt("SHOAL_BENCH_RELAY_MIB", 256)) << 20
	lay := newLayout(b, b.TempDir())
	blob := lay.putRandom(b, size, 2)
	lay.addImage(b, "docker.io/library/relay:v1", []ocispecDescriptor{blob})
	mem := routing.NewMemoryNetwork()
	a := inProcessNode(b, mem, "A", lay.dir)
	bn := inProcessNode(b, mem, "B", newLayout(b, b.TempDir()).dir)
	c := newClient()
	urlA := blobURL(a, "library/relay", blob.Digest)
	urlB := blobURL(bn, "library/relay", blob.Digest)
	for _, u := range []string{urlA, urlB} { // warm up
		if _, err := download(c, u, size); err != nil {
			b.Fatal(err)
		}
	}
	logf("BenchmarkRelayInProcess: %d MiB, %d rounds, MiB/s", size>>20, rounds())
	meds := sideBySide(b, rounds(), "MiB/s",
		contender{"local", func() (float64, error) { return download(c, urlA, size) }},
		contender{"relay", func() (float64, error) { return download(c, urlB, size) }},
	)
	ratio := meds[1] / meds[0]
	result(b, "node/in-process-relay-vs-local", fmt.Sprintf("relay=%.0f local=%.0f MiB/s", meds[1], meds[0]), ratio, ">= 0.9 (informative)", ratio >= 0.9)
}
