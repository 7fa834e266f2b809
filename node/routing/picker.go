package routing

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"
)

// Picker orders candidate peers for a fetch: peers in the local zone first,
// then the peers with the fewest requests in flight. A peer whose request
// failed sits out a cool-down, during which Order leaves it out.
//
// A Picker is safe for concurrent use.
type Picker struct {
	zone     string
	coolDown time.Duration
	now      func() time.Time

	mu       sync.Mutex
	calls    int // Order calls, to rotate ties
	inFlight map[string]int
	until    map[string]time.Time // peer ID -> end of its cool-down
}

// NewPicker returns a Picker for a node in zone ("" if unknown) that keeps a
// failed peer out of Order for coolDown. now is the clock; nil means
// time.Now.
func NewPicker(zone string, coolDown time.Duration, now func() time.Time) *Picker {
	if now == nil {
		now = time.Now
	}
	return &Picker{
		zone:     zone,
		coolDown: coolDown,
		now:      now,
		inFlight: make(map[string]int),
		until:    make(map[string]time.Time),
	}
}

// Order returns a new slice with the peers that are not in cool-down: peers
// in the picker's zone first, then fewest requests in flight. Ties rotate
// from one call to the next (the first call keeps the input order), so
// requests that arrive together, before any is in flight, still spread over
// the peers. The input slice is not modified.
func (p *Picker) Order(peers []Peer) []Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	rot := p.calls
	p.calls++
	type entry struct {
		peer     Peer
		sameZone bool
		inFlight int
		turn     int
	}
	entries := make([]entry, 0, len(peers))
	for _, peer := range peers {
		if until, ok := p.until[peer.ID]; ok {
			if now.Before(until) {
				continue
			}
			delete(p.until, peer.ID)
		}
		entries = append(entries, entry{
			peer:     peer,
			sameZone: p.zone != "" && peer.Zone == p.zone,
			inFlight: p.inFlight[peer.ID],
		})
	}
	for i := range entries {
		entries[i].turn = (i - rot%len(entries) + len(entries)) % len(entries)
	}
	sort.SliceStable(entries, func(i, j int) bool {
		if entries[i].sameZone != entries[j].sameZone {
			return entries[i].sameZone
		}
		if entries[i].inFlight != entries[j].inFlight {
			return entries[i].inFlight < entries[j].inFlight
		}
		return entries[i].turn < entries[j].turn
	})
	out := make([]Peer, len(entries))
	for i, e := range entries {
		out[i] = e.peer
	}
	return out
}

// CoolDown puts peer in cool-down now, for a fault found after its request
// ended (bytes that failed their digest check).
func (p *Picker) CoolDown(peer Peer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.until[peer.ID] = p.now().Add(p.coolDown)
}

// Start records a request to peer and returns the function to call when it
// ends. done is safe to call more than once; only the first call counts. A
// non-nil err puts the peer in cool-down, except context.Canceled: a request
// the caller abandoned (for example the loser of a hedged pair) says nothing
// about the peer.
func (p *Picker) Start(peer Peer) (done func(err error)) {
	p.mu.Lock()
	p.inFlight[peer.ID]++
	p.mu.Unlock()
	var once sync.Once
	return func(err error) {
		once.Do(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.inFlight[peer.ID] <= 1 {
				delete(p.inFlight, peer.ID)
			} else {
				p.inFlight[peer.ID]--
			}
			if err != nil && !errors.Is(err, context.Canceled) {
				p.until[peer.ID] = p.now().Add(p.coolDown)
			}
		})
	}
}
