package node

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests   *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	lookup     prometheus.Histogram
	hedges     prometheus.Counter
	resumes    prometheus.Counter
	aborts     prometheus.Counter
	closed     prometheus.Counter
	peerErrors prometheus.Counter
	keys       prometheus.Gauge
	striped    prometheus.Counter
	// inflightBytes counts bytes served to peers from transfers still in
	// progress (herd.go).
	inflightBytes prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_node_requests_total",
			Help: "Registry requests served by the node, by source (local, peer, cache, inflight: to a peer from a blob still arriving, miss) and kind (manifest, blob).",
		}, []string{"source", "kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_node_served_bytes_total",
			Help: "Body bytes served by the node, by source (local, peer, cache, receiver: a node still receiving the blob).",
		}, []string{"source"}),
		lookup: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shoal_node_peer_lookup_duration_seconds",
			Help:    "Time to look a key up in the DHT, as the handler sees it.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		hedges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_hedged_requests_total",
			Help: "Extra peer requests sent because the first peer was slow to answer.",
		}),
		resumes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_resumed_transfers_total",
			Help: "Blob transfers that broke mid-stream and resumed on another source with Range.",
		}),
		aborts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_aborted_transfers_total",
			Help: "Relayed transfers cut off because no source could finish them or the bytes did not match the digest.",
		}),
		closed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_client_closed_transfers_total",
			Help: "Relayed transfers the client closed before their end (containerd's chunked fetch closes each chunk); no source is blamed.",
		}),
		peerErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_peer_errors_total",
			Help: "Peer answers that failed or were unusable (connection, timeout, error status, bad framing, wrong range or digest); the peer is skipped for a cool-down.",
		}),
		striped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_striped_transfers_total",
			Help: "Blob transfers fetched from several peers at once as parallel ranges (blobs of at least --stripe-min-size).",
		}),
		inflightBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_node_inflight_served_bytes_total",
			Help: "Bytes served to peers from blobs this node's containerd was still receiving (a herd: many nodes pulling one image at once).",
		}),
		keys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_node_advertised_keys",
			Help: "Digests and tags this node advertises to its peers.",
		}),
	}
	// Pre-create the label sets dashboards plot, so they read 0, not "no data".
	for _, src := range []string{sourceLocal, sourcePeer, sourceCache, sourceMiss} {
		for _, kind := range []string{"manifest", "blob"} {
			m.requests.WithLabelValues(src, kind)
		}
		if src != sourceMiss {
			m.bytes.WithLabelValues(src)
		}
	}
	m.requests.WithLabelValues(sourceInflight, "blob")
	m.bytes.WithLabelValues(sourceReceiver)
	for _, c := range []prometheus.Collector{m.requests, m.bytes, m.lookup, m.hedges, m.resumes, m.aborts, m.closed, m.peerErrors, m.keys, m.striped, m.inflightBytes} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
