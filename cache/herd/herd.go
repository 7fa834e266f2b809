// Package herd spreads one blob over the nodes that ask the cache tier for
// it at the same moment. The first few (Config.Direct) are served by the
// cache tier; each later one is sent to a node that is receiving the blob
// already, which serves it the bytes as they arrive. The nodes form chains
// behind the direct ones, so every node's uplink carries one copy and the
// cache tier's carries Direct copies, however many nodes ask.
//
// A herd lives in memory for as long as nodes keep joining it (Config.Linger
// after the last join and the last direct stream); nothing of it is stored.
package herd

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Config configures a Tracker.
type Config struct {
	// Direct is how many nodes of a herd the cache tier serves itself.
	// Default 1: one chain, every uplink (the cache tier's too) carrying
	// one copy at its full rate. Two chains share the cache tier's uplink
	// and run at half the rate each.
	Direct int
	// Linger is how long a herd is kept after its last join and its last
	// direct stream. Default 1m.
	Linger time.Duration
	// MaxReceivers is how many receivers a redirected node is told, nearest
	// the source first. Default 3.
	MaxReceivers int
	// MaxMembers bounds one herd; past it, nodes are served directly.
	// Default 4096.
	MaxMembers int
	// MaxHerds bounds the blobs tracked at once; past it, nodes asking for
	// a new blob are served directly. Default 4096.
	MaxHerds int
	// Registerer receives the metrics; nil: none.
	Registerer prometheus.Registerer
	// Now is the clock; default time.Now.
	Now func() time.Time
}

func (c *Config) setDefaults() {
	if c.Direct <= 0 {
		c.Direct = 1
	}
	if c.Linger <= 0 {
		c.Linger = time.Minute
	}
	if c.MaxReceivers <= 0 {
		c.MaxReceivers = 3
	}
	if c.MaxMembers <= 0 {
		c.MaxMembers = 4096
	}
	if c.MaxHerds <= 0 {
		c.MaxHerds = 4096
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Tracker tracks the herds of one cache replica.
type Tracker struct {
	cfg     Config
	metrics *metrics

	mu    sync.Mutex
	herds map[string]*herd
	swept time.Time
}

type herd struct {
	members map[string]*member
	tails   []*member // members no one is chained behind yet, shallowest first
	roots   int       // members served directly
	active  int       // direct streams in progress
	copies  int       // direct streams started (forced ones included)
	sent    int64     // bytes of direct streams
	last    time.Time
}

type member struct {
	parent *member
	id     string
	addrs  string
	depth  int
	direct bool
}

// New returns a Tracker.
func New(cfg Config) (*Tracker, error) {
	cfg.setDefaults()
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	return &Tracker{cfg: cfg, metrics: m, herds: make(map[string]*herd)}, nil
}

// Member is a node in a herd: its peer ID and the addresses it can be
// dialled at, as the node gave them (oci.HerdAddrsHeader), so that the
// nodes sent to it need not look it up.
type Member struct {
	ID    string
	Addrs string
}

// Join is node's request for the blob key. force says the node's receivers
// could not serve it (or it asks for a range to resume). When receivers is
// empty the cache tier serves the node and calls done with the bytes it
// sent; otherwise it tells the node to ask receivers, and done is nil.
func (t *Tracker) Join(key string, node Member, force bool) (receivers []Member, done func(sent int64)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.cfg.Now()
	t.sweep(now)
	h := t.herds[key]
	if h == nil {
		if len(t.herds) >= t.cfg.MaxHerds {
			t.metrics.requests.WithLabelValues("direct").Inc()
			return nil, func(int64) {}
		}
		h = &herd{members: make(map[string]*member)}
		t.herds[key] = h
	}
	h.last = now
	m := h.members[node.ID]
	if m != nil && node.Addrs != "" {
		m.addrs = node.Addrs
	}
	switch {
	case m != nil && !m.direct && !force:
		// Asked again (another chunk, a retry): the same receivers.
		t.metrics.requests.WithLabelValues("redirected").Inc()
		return m.ancestors(t.cfg.MaxReceivers), nil
	case m == nil && !force && h.roots >= t.cfg.Direct && len(h.members) < t.cfg.MaxMembers:
		m = h.chain(node)
		t.metrics.requests.WithLabelValues("redirected").Inc()
		return m.ancestors(t.cfg.MaxReceivers), nil
	case m == nil:
		m = &member{id: node.ID, addrs: node.Addrs, direct: true}
		h.members[node.ID] = m
		h.roots++
		h.tails = append([]*member{m}, h.tails...)
	}
	if force {
		t.metrics.requests.WithLabelValues("forced").Inc()
	} else {
		t.metrics.requests.WithLabelValues("direct").Inc()
	}
	h.active++
	h.copies++
	var once sync.Once
	return nil, func(sent int64) {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			h.active--
			h.sent += sent
			h.last = t.cfg.Now()
		})
	}
}

// chain adds node behind the shallowest tail and returns it.
func (h *herd) chain(node Member) *member {
	parent := h.tails[0]
	m := &member{id: node.ID, addrs: node.Addrs, parent: parent, depth: parent.depth + 1}
	h.members[node.ID] = m
	// parent is no longer a tail; m is, at depth+1: keep tails sorted.
	h.tails = h.tails[1:]
	i := len(h.tails)
	for i > 0 && h.tails[i-1].depth > m.depth {
		i--
	}
	h.tails = append(h.tails, nil)
	copy(h.tails[i+1:], h.tails[i:])
	h.tails[i] = m
	return m
}

// ancestors is the chain ahead of m, nearest first: the nodes that have
// more of the blob than m, so m never waits on its own followers.
func (m *member) ancestors(max int) []Member {
	var out []Member
	for p := m.parent; p != nil && len(out) < max; p = p.parent {
		out = append(out, Member{ID: p.id, Addrs: p.addrs})
	}
	return out
}

// sweep drops herds that are over, at most once a second.
func (t *Tracker) sweep(now time.Time) {
	if now.Sub(t.swept) < time.Second {
		return
	}
	t.swept = now
	for k, h := range t.herds {
		if h.active == 0 && now.Sub(h.last) > t.cfg.Linger {
			t.metrics.size.Observe(float64(len(h.members)))
			t.metrics.copies.Observe(float64(h.copies))
			t.metrics.egress.Observe(float64(h.sent))
			delete(t.herds, k)
		}
	}
	t.metrics.herds.Set(float64(len(t.herds)))
}

type metrics struct {
	requests *prometheus.CounterVec
	herds    prometheus.Gauge
	size     prometheus.Histogram
	copies   prometheus.Histogram
	egress   prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_cache_herd_requests_total",
			Help: "Node blob requests by herd decision: direct (served by the cache tier), redirected (sent to nodes receiving the blob), forced (served after the receivers could not).",
		}, []string{"result"}),
		herds: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_cache_herds",
			Help: "Blobs with a herd in progress on this replica.",
		}),
		size: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shoal_cache_herd_size",
			Help:    "Nodes that asked for one blob in one herd, observed when the herd ends.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024},
		}),
		copies: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shoal_cache_herd_copies",
			Help:    "Copies of one blob the cache tier sent in one herd, observed when the herd ends.",
			Buckets: []float64{1, 2, 3, 4, 6, 8, 16, 32, 64},
		}),
		egress: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shoal_cache_herd_egress_bytes",
			Help:    "Bytes of one blob the cache tier sent in one herd, observed when the herd ends.",
			Buckets: prometheus.ExponentialBuckets(1<<20, 4, 8),
		}),
	}
	for _, r := range []string{"direct", "redirected", "forced"} {
		m.requests.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.requests, m.herds, m.size, m.copies, m.egress} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
