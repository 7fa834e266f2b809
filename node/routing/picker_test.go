package routing

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func ids(peers []Peer) []string {
	out := make([]string, len(peers))
	for i, p := range peers {
		out[i] = p.ID
	}
	return out
}

func TestPickerOrder(t *testing.T) {
	a := Peer{ID: "a", Zone: "z1"}
	b := Peer{ID: "b", Zone: "z2"}
	c := Peer{ID: "c", Zone: "z1"}
	d := Peer{ID: "d"}
	tests := []struct {
		name     string
		zone     string
		inFlight map[string]int
		peers    []Peer
		want     []string
	}{
		{name: "same_zone_first", zone: "z2", peers: []Peer{a, b, c}, want: []string{"b", "a", "c"}},
		{name: "least_in_flight_within_zone", zone: "z1", inFlight: map[string]int{"a": 2}, peers: []Peer{a, b, c}, want: []string{"c", "a", "b"}},
		{name: "zone_beats_in_flight", zone: "z1", inFlight: map[string]int{"a": 5, "c": 5}, peers: []Peer{b, a, c}, want: []string{"a", "c", "b"}},
		{name: "no_zone_orders_by_in_flight", zone: "", inFlight: map[string]int{"a": 1, "b": 3}, peers: []Peer{b, a, c, d}, want: []string{"c", "d", "a", "b"}},
		{name: "stable_when_equal", zone: "", peers: []Peer{d, c, b, a}, want: []string{"d", "c", "b", "a"}},
		{name: "empty_zone_peer_is_not_same_zone", zone: "z9", peers: []Peer{d, b}, want: []string{"d", "b"}},
		{name: "empty_input", zone: "z1", peers: nil, want: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := NewPicker(tt.zone, time.Minute, nil)
			for id, n := range tt.inFlight {
				for range n {
					p.Start(Peer{ID: id})
				}
			}
			in := append([]Peer(nil), tt.peers...)
			got := ids(p.Order(tt.peers))
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Order = %v, want %v", got, tt.want)
			}
			if !reflect.DeepEqual(in, tt.peers) {
				t.Fatalf("Order modified its input: %v", tt.peers)
			}
		})
	}
}

func TestPickerDoneDecrementsInFlight(t *testing.T) {
	p := NewPicker("", time.Minute, nil)
	a, b := Peer{ID: "a"}, Peer{ID: "b"}
	doneA := p.Start(a)
	if got := ids(p.Order([]Peer{a, b})); !reflect.DeepEqual(got, []string{"b", "a"}) {
		t.Fatalf("with a busy: %v", got)
	}
	doneA(nil)
	doneA(nil) // second call is a no-op, must not go negative
	p.Start(b)
	if got := ids(p.Order([]Peer{a, b})); !reflect.DeepEqual(got, []string{"a", "b"}) {
		t.Fatalf("after a done, b busy: %v", got)
	}
}

func TestPickerCoolDown(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	a, b := Peer{ID: "a"}, Peer{ID: "b"}
	tests := []struct {
		name    string
		err     error
		advance time.Duration
		want    []string
	}{
		{name: "success_keeps_peer", err: nil, want: []string{"a", "b"}},
		{name: "failure_skips_peer", err: errors.New("boom"), want: []string{"b"}},
		{name: "failure_skips_peer_until_just_before_expiry", err: errors.New("boom"), advance: 10*time.Second - time.Nanosecond, want: []string{"b"}},
		{name: "cool_down_expires", err: errors.New("boom"), advance: 10 * time.Second, want: []string{"a", "b"}},
		{name: "canceled_is_not_a_failure", err: context.Canceled, want: []string{"a", "b"}},
		{name: "wrapped_failure_counts", err: errors.Join(errors.New("read"), context.DeadlineExceeded), want: []string{"b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock.t = time.Unix(1000, 0)
			p := NewPicker("", 10*time.Second, clock.now)
			p.Start(a)(tt.err)
			clock.t = clock.t.Add(tt.advance)
			if got := ids(p.Order([]Peer{a, b})); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Order = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPickerConcurrentUse(t *testing.T) {
	p := NewPicker("z", time.Millisecond, nil)
	peers := []Peer{{ID: "a", Zone: "z"}, {ID: "b"}}
	doneCh := make(chan struct{})
	for i := range 8 {
		go func() {
			defer func() { doneCh <- struct{}{} }()
			for j := range 100 {
				var err error
				if (i+j)%7 == 0 {
					err = errors.New("x")
				}
				p.Start(peers[j%2])(err)
				p.Order(peers)
			}
		}()
	}
	for range 8 {
		<-doneCh
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.inFlight) != 0 {
		t.Fatalf("in-flight not back to zero: %v", p.inFlight)
	}
}

// Requests that arrive together, before any is in flight, spread over the
// peers: ties rotate from one Order call to the next.
func TestPickerRotatesTies(t *testing.T) {
	p := NewPicker("", time.Minute, nil)
	peers := []Peer{{ID: "a"}, {ID: "b"}, {ID: "c"}}
	firsts := map[string]int{}
	for range 6 {
		firsts[p.Order(peers)[0].ID]++
	}
	for _, id := range []string{"a", "b", "c"} {
		if firsts[id] != 2 {
			t.Fatalf("first picks over 6 calls: %v, want 2 each", firsts)
		}
	}
	// Load still comes first: a busy peer is not picked first.
	done := p.Start(Peer{ID: "a"})
	defer done(nil)
	for range 3 {
		if got := p.Order(peers)[0].ID; got == "a" {
			t.Fatal("the busy peer was picked first")
		}
	}
}
