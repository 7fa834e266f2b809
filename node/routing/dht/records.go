package dht

import (
	"context"
	"encoding/base32"
	"encoding/binary"
	"strings"
	"sync"

	ds "github.com/ipfs/go-datastore"
	dsq "github.com/ipfs/go-datastore/query"
)

// recordStore is the datastore behind kad-dht's provider manager: the
// records this node keeps for others (every node keeps about
// --provider-replication x the keys of an average node, and the first nodes
// of a cluster keep more). kad-dht writes each record as a key
// "/providers/<base32 multihash>/<base32 peer ID>" with the record's time as
// a varint; in go-datastore's map store that costs about 230 bytes a
// record. recordStore keeps the multihash as fixed-size bytes, the peer as
// an index into a table and the time as an int64: about 60 bytes for a
// SHA-256 key (BenchmarkRecordStoreMemory). Anything else kad-dht might write is kept as given.
//
// It answers a prefix query for one key from that key's entry, where the
// map store walks every record.
type recordStore struct {
	mu sync.Mutex
	// recs holds records for SHA-256 multihashes (what shoal's keys are),
	// most of them a key one provider gave this node.
	recs sparse[shaKey, record]
	// peers interns provider peer IDs (raw bytes, as strings).
	peers interner[string]
	// other holds every key recordStore does not parse, as the map store would.
	other map[ds.Key][]byte
}

// shaKey is the digest of a SHA-256 multihash (which is 0x12 0x20, then
// these 32 bytes).
type shaKey [32]byte

// shaPrefix is the multihash header of a SHA-256 digest.
var shaPrefix = [2]byte{0x12, 0x20}

type record struct {
	peer uint32
	t    int64 // the varint kad-dht stored, decoded
}

const providersPrefix = "/providers/"

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

func newRecordStore() *recordStore {
	return &recordStore{
		recs:  newSparse[shaKey, record](),
		peers: newInterner[string](),
		other: make(map[ds.Key][]byte),
	}
}

// parse splits a provider record's key; ok is false for anything else.
func parseRecordKey(k string) (mh shaKey, peerID string, ok bool) {
	rest, found := strings.CutPrefix(k, providersPrefix)
	if !found {
		return mh, "", false
	}
	km, kp, found := strings.Cut(rest, "/")
	if !found || strings.Contains(kp, "/") {
		return mh, "", false
	}
	mh, ok = decodeSHAKey(km)
	if !ok {
		return mh, "", false
	}
	p, err := b32.DecodeString(kp)
	if err != nil || len(p) == 0 || b32.EncodeToString(p) != kp {
		return mh, "", false
	}
	return mh, string(p), true
}

// parseRecordPrefix reads "/providers/<base32 multihash>" (a query for one
// key's records).
func parseRecordPrefix(prefix string) (mh shaKey, ok bool) {
	km, found := strings.CutPrefix(strings.TrimSuffix(prefix, "/"), providersPrefix)
	if !found || strings.Contains(km, "/") {
		return mh, false
	}
	return decodeSHAKey(km)
}

// decodeSHAKey reads the base32 form of a SHA-256 multihash. Only the
// canonical encoding counts, so that the key written back is the key read.
func decodeSHAKey(s string) (mh shaKey, ok bool) {
	raw, err := b32.DecodeString(s)
	if err != nil || len(raw) != 2+len(mh) || raw[0] != shaPrefix[0] || raw[1] != shaPrefix[1] || b32.EncodeToString(raw) != s {
		return mh, false
	}
	copy(mh[:], raw[2:])
	return mh, true
}

func encodeSHAKey(mh shaKey) string {
	return b32.EncodeToString(append(shaPrefix[:], mh[:]...))
}

func (r record) peerIndex() uint32 { return r.peer }

// Put implements ds.Write.
func (s *recordStore) Put(_ context.Context, key ds.Key, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	mh, p, ok := parseRecordKey(key.String())
	t, n := binary.Varint(value)
	if !ok || n <= 0 || n != len(value) {
		if ok {
			s.drop(mh, p)
		}
		s.other[key] = append([]byte(nil), value...)
		return nil
	}
	delete(s.other, key)
	i := s.peers.id(p)
	rs := s.recs.get(mh)
	if j := indexOfPeer(rs, i); j >= 0 {
		rs[j].t = t
	} else {
		rs = append(rs, record{peer: i, t: t})
	}
	s.recs.put(mh, rs)
	return nil
}

// drop removes p's record for mh, if there is one.
func (s *recordStore) drop(mh shaKey, p string) {
	i, known := s.peers.lookup(p)
	if !known {
		return
	}
	removePeer(s.recs, mh, i)
}

// Delete implements ds.Write.
func (s *recordStore) Delete(_ context.Context, key ds.Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.other, key)
	if mh, p, ok := parseRecordKey(key.String()); ok {
		s.drop(mh, p)
	}
	return nil
}

// Get implements ds.Read.
func (s *recordStore) Get(_ context.Context, key ds.Key) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if mh, p, ok := parseRecordKey(key.String()); ok {
		if i, known := s.peers.lookup(p); known {
			rs := s.recs.get(mh)
			if j := indexOfPeer(rs, i); j >= 0 {
				return binary.AppendVarint(nil, rs[j].t), nil
			}
		}
	}
	v, found := s.other[key]
	if !found {
		return nil, ds.ErrNotFound
	}
	return append([]byte(nil), v...), nil
}

// Has implements ds.Read.
func (s *recordStore) Has(ctx context.Context, key ds.Key) (bool, error) {
	_, err := s.Get(ctx, key)
	if err == ds.ErrNotFound {
		return false, nil
	}
	return err == nil, err
}

// GetSize implements ds.Read.
func (s *recordStore) GetSize(ctx context.Context, key ds.Key) (int, error) {
	v, err := s.Get(ctx, key)
	if err != nil {
		return -1, err
	}
	return len(v), nil
}

// Query implements ds.Read. A query for one key's records reads that key's
// entry; any other query walks everything, as the map store does.
func (s *recordStore) Query(_ context.Context, q dsq.Query) (dsq.Results, error) {
	s.mu.Lock()
	var entries []dsq.Entry
	add := func(mh shaKey, r record) {
		v := binary.AppendVarint(nil, r.t)
		e := dsq.Entry{Key: providersPrefix + encodeSHAKey(mh) + "/" + b32.EncodeToString([]byte(s.peers.value(r.peer))), Size: len(v)}
		if !q.KeysOnly {
			e.Value = v
		}
		entries = append(entries, e)
	}
	if mh, ok := parseRecordPrefix(q.Prefix); ok {
		for _, r := range s.recs.get(mh) {
			add(mh, r)
		}
	} else {
		for mh, r := range s.recs.one {
			add(mh, r)
		}
		for mh, rs := range s.recs.many {
			for _, r := range rs {
				add(mh, r)
			}
		}
	}
	// What kad-dht does not write is rare; NaiveQueryApply filters it.
	for k, v := range s.other {
		e := dsq.Entry{Key: k.String(), Size: len(v)}
		if !q.KeysOnly {
			e.Value = append([]byte(nil), v...)
		}
		entries = append(entries, e)
	}
	s.mu.Unlock()
	return dsq.NaiveQueryApply(q, dsq.ResultsWithEntries(q, entries)), nil
}

// Batch implements ds.Batching: the writes are applied on Commit.
func (s *recordStore) Batch(context.Context) (ds.Batch, error) { return ds.NewBasicBatch(s), nil }

// Sync implements ds.Datastore; records live in memory only.
func (s *recordStore) Sync(context.Context, ds.Key) error { return nil }

// Close implements ds.Datastore.
func (s *recordStore) Close() error { return nil }

// Len returns how many provider records the store holds.
func (s *recordStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.recs.one)
	for _, rs := range s.recs.many {
		n += len(rs)
	}
	return n
}

var _ ds.Batching = (*recordStore)(nil)
