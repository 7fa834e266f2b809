package budget

import (
	"context"
	"maps"
	"sort"
	"sync"
	"time"
)

// Key names one budget: an upstream registry host and the account that pulls
// from it ("anonymous" or a username, never a secret).
type Key struct {
	Upstream string `json:"upstream"`
	Account  string `json:"account"`
}

// Record is what a State stores per Key.
type Record struct {
	Key Key `json:"key"`
	// Limit is the number of counted requests per Window; 0 means unknown
	// or unlimited.
	Limit     int           `json:"limit"`
	Remaining int           `json:"remaining"`
	Window    time.Duration `json:"window"`
	// ResetAt is when the window observed at ObservedAt ends at the latest.
	ResetAt    time.Time `json:"resetAt"`
	ObservedAt time.Time `json:"observedAt"`
	// BlockedUntil is set after a 429.
	BlockedUntil time.Time `json:"blockedUntil"`
	// Spent counts the counted requests recorded with Spend.
	Spent int `json:"spent"`
	// Throttled counts the 429 answers observed.
	Throttled int `json:"throttled"`
	// Rate is an exponentially decaying estimate of counted requests per
	// second, as of RateAt.
	Rate   float64   `json:"rate"`
	RateAt time.Time `json:"rateAt"`
	// Clients counts the counted requests each client (node) caused since
	// ClientsSince; it restarts every window.
	Clients      map[string]int `json:"clients,omitempty"`
	ClientsSince time.Time      `json:"clientsSince"`
}

// State stores budget records. Implementations must apply Update atomically
// per key, also across processes when they share the state.
type State interface {
	// Load returns the record for key, or a zero Record carrying key.
	Load(ctx context.Context, key Key) (Record, error)
	// Update loads the record for key (a zero Record carrying key when
	// absent), calls fn on it and stores the result, which lives for the
	// duration fn returns. fn may run more than once; it must only change
	// the record.
	Update(ctx context.Context, key Key, fn func(*Record) (ttl time.Duration)) (Record, error)
	// List returns every live record.
	List(ctx context.Context) ([]Record, error)
}

// MemoryState is a State for one process.
type MemoryState struct {
	mu sync.Mutex
	m  map[Key]memEntry
}

type memEntry struct {
	r       Record
	expires time.Time
}

// NewMemoryState returns an empty in-process State.
func NewMemoryState() *MemoryState { return &MemoryState{m: make(map[Key]memEntry)} }

func (s *MemoryState) get(key Key, now time.Time) Record {
	e, ok := s.m[key]
	if !ok || !now.Before(e.expires) {
		delete(s.m, key)
		return Record{Key: key}
	}
	r := e.r
	r.Clients = maps.Clone(r.Clients) // callers own what they get
	return r
}

// Load implements State.
func (s *MemoryState) Load(_ context.Context, key Key) (Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.get(key, time.Now()), nil
}

// Update implements State.
func (s *MemoryState) Update(_ context.Context, key Key, fn func(*Record) time.Duration) (Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	r := s.get(key, now)
	ttl := fn(&r)
	r.Key = key
	s.m[key] = memEntry{r: r, expires: now.Add(ttl)}
	return r, nil
}

// List implements State.
func (s *MemoryState) List(_ context.Context) ([]Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	out := make([]Record, 0, len(s.m))
	for k, e := range s.m {
		if now.Before(e.expires) {
			out = append(out, e.r)
		} else {
			delete(s.m, k)
		}
	}
	sortRecords(out)
	return out, nil
}

func sortRecords(rs []Record) {
	sort.Slice(rs, func(i, j int) bool {
		if rs[i].Key.Upstream != rs[j].Key.Upstream {
			return rs[i].Key.Upstream < rs[j].Key.Upstream
		}
		return rs[i].Key.Account < rs[j].Key.Account
	})
}
