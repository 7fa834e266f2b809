// Package routing holds what the node needs to find peers that hold a key:
// the Peer type, peer picking (zone first, then least in-flight, skipping
// peers in a failure cool-down), and an in-memory Router for tests. The
// libp2p kad-dht implementation lives in node/routing/dht; the conformance
// suite every implementation passes lives in node/routing/routingtest.
package routing

// Peer is another node that advertised a key.
type Peer struct {
	// ID identifies the peer (a libp2p peer ID for the DHT router).
	ID string
	// Addr is the base URL of the peer's registry, e.g. "http://10.0.0.7:5000".
	Addr string
	// Zone is the topology zone the peer advertised, "" if none.
	Zone string
}
