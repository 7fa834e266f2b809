package dht

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"time"

	ds "github.com/ipfs/go-datastore"
	dsq "github.com/ipfs/go-datastore/query"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/peerstore/pstoremem"
	mh "github.com/multiformats/go-multihash"

	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

func recordKey(h []byte, p string) ds.Key {
	return ds.NewKey(providersPrefix + b32.EncodeToString(h) + "/" + b32.EncodeToString([]byte(p)))
}

func shaMultihash(t testing.TB, i int) []byte {
	t.Helper()
	m, err := mh.Sum(fmt.Appendf(nil, "key %d", i), mh.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func queryAll(t *testing.T, d ds.Datastore, prefix string) []string {
	t.Helper()
	res, err := d.Query(context.Background(), dsq.Query{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	es, err := res.Rest()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Key + "=" + fmt.Sprint(e.Value)
	}
	slices.Sort(out)
	return out
}

// recordStore answers like go-datastore's map store, operation for
// operation: provider records, keys it does not parse, deletes and prefix
// queries.
func TestRecordStoreMatchesMapDatastore(t *testing.T) {
	ctx := context.Background()
	want := ds.NewMapDatastore()
	got := newRecordStore()
	rng := rand.New(rand.NewPCG(1, 2))
	keys := make([][]byte, 20)
	for i := range keys {
		keys[i] = shaMultihash(t, i)
	}
	keys = append(keys, []byte("not a multihash"))
	peers := []string{"peer-a", "peer-b", "peer-c"}
	var all []ds.Key
	for range 2000 {
		k := recordKey(keys[rng.IntN(len(keys))], peers[rng.IntN(len(peers))])
		switch rng.IntN(10) {
		case 0:
			k = ds.NewKey(fmt.Sprintf("/other/%d", rng.IntN(5)))
		case 1:
			k = ds.NewKey(k.String() + "/extra")
		}
		all = append(all, k)
		switch rng.IntN(4) {
		case 0:
			victim := all[rng.IntN(len(all))]
			for _, d := range []ds.Datastore{want, got} {
				if err := d.Delete(ctx, victim); err != nil {
					t.Fatal(err)
				}
			}
		default:
			v := binary.AppendVarint(nil, rng.Int64())
			if rng.IntN(5) == 0 {
				v = []byte("not a varint \xff\xff")
			}
			for _, d := range []ds.Datastore{want, got} {
				if err := d.Put(ctx, k, v); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	for _, prefix := range []string{"", "/providers", "/providers/", "/other", providersPrefix + b32.EncodeToString(keys[3]), providersPrefix + b32.EncodeToString(keys[len(keys)-1])} {
		if w, g := queryAll(t, want, prefix), queryAll(t, got, prefix); !slices.Equal(w, g) {
			t.Errorf("Query(%q): %d entries, want %d", prefix, len(g), len(w))
		}
	}
	for _, k := range all {
		wv, werr := want.Get(ctx, k)
		gv, gerr := got.Get(ctx, k)
		if (werr == nil) != (gerr == nil) || !slices.Equal(wv, gv) {
			t.Fatalf("Get(%s) = %v, %v; want %v, %v", k, gv, gerr, wv, werr)
		}
		if has, _ := got.Has(ctx, k); has != (werr == nil) {
			t.Fatalf("Has(%s) = %v", k, has)
		}
	}
}

// kad-dht's provider manager works over recordStore: records added are
// returned, and expired ones are dropped.
func TestProviderManagerOverRecordStore(t *testing.T) {
	ctx := context.Background()
	self := peer.ID("self")
	store := newRecordStore()
	ps, err := pstoremem.NewPeerstore()
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	pm, err := records.NewProviderManager(self, ps, store, records.ProvideValidity(time.Second), records.CleanupInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	k := shaMultihash(t, 1)
	for _, p := range []peer.ID{testPeerID(t), testPeerID(t)} {
		if err := pm.AddProvider(ctx, k, peer.AddrInfo{ID: p}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := pm.GetProviders(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("GetProviders = %v, want 2", got)
	}
	waitFor(t, 10*time.Second, "expired records are collected", func() bool {
		_ = pm.Close() // flushes what is buffered; the GC loop stops too
		return true
	})
	if store.Len() != 2 {
		t.Fatalf("store holds %d records after the flush, want 2", store.Len())
	}
	pm2, err := records.NewProviderManager(self, ps, store, records.ProvideValidity(time.Millisecond), records.CleanupInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer pm2.Close()
	waitFor(t, 10*time.Second, "expired records are collected", func() bool { return store.Len() == 0 })
}

func testPeerID(t *testing.T) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// BenchmarkRecordStoreMemory reports the heap per provider record in
// recordStore and in go-datastore's map store, side by side, for 20,000
// records (what one node keeps for others at 2,000 keys a node and
// replication 10).
func BenchmarkRecordStoreMemory(b *testing.B) {
	const n = 20_000
	ctx := context.Background()
	ks := make([]ds.Key, n)
	for i := range ks {
		ks[i] = recordKey(shaMultihash(b, i), fmt.Sprintf("peer-%02d-%s", i%50, wire.HashKey("x")))
	}
	v := binary.AppendVarint(nil, time.Now().UnixNano())
	measure := func(d ds.Datastore) float64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for _, k := range ks {
			// kad-dht builds each key and value afresh for its Put.
			if err := d.Put(ctx, ds.NewKey(string([]byte(k.String()))), append([]byte(nil), v...)); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(d)
		return float64(after.HeapAlloc-before.HeapAlloc) / n
	}
	var compact, mapped float64
	for b.Loop() {
		compact = measure(newRecordStore())
		mapped = measure(ds.NewMapDatastore())
	}
	b.ReportMetric(compact, "bytes/record")
	b.ReportMetric(mapped, "map-bytes/record")
	b.ReportMetric(mapped/compact, "x-smaller")
}
