package dht

import (
	"fmt"
	"net"
	"strings"
)

// Peers learn each other's registry address and zone from the libp2p
// identify protocol: every node sets its UserAgent to
//
//	shoal/1 registry=<host:port> zone=<zone>
//
// (zone= is left out when the node has no zone). identify stores the remote
// UserAgent in the peerstore under "AgentVersion" as soon as a connection is
// up, so a Lookup needs no extra round trip. A peer whose agent does not
// start with agentPrefix is not a shoal node and is never returned.
const agentPrefix = "shoal/1"

// agentString builds this node's UserAgent.
func agentString(registryAddr, zone string) string {
	s := agentPrefix + " registry=" + registryAddr
	if zone != "" {
		s += " zone=" + zone
	}
	return s
}

// parseAgent reads a UserAgent written by agentString.
func parseAgent(ua string) (registry, zone string, ok bool) {
	fields := strings.Fields(ua)
	if len(fields) == 0 || fields[0] != agentPrefix {
		return "", "", false
	}
	for _, f := range fields[1:] {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "registry":
			registry = v
		case "zone":
			zone = v
		}
	}
	return registry, zone, registry != ""
}

// registryURL returns the base URL of a peer's registry. registry is the
// host:port the peer advertised; when its host is empty or unspecified
// (0.0.0.0, ::), the IP the peer's libp2p connection comes from is used.
func registryURL(registry string, connIP net.IP) (string, error) {
	host, port, err := net.SplitHostPort(registry)
	if err != nil {
		return "", fmt.Errorf("registry address %q: %w", registry, err)
	}
	ip := net.ParseIP(host)
	switch {
	case host == "" || (ip != nil && ip.IsUnspecified()):
		if connIP == nil {
			return "", fmt.Errorf("registry address %q has no host and the peer's IP is unknown", registry)
		}
		host = connIP.String()
	case ip == nil || connIP == nil || !ip.Equal(connIP):
		// A member may only point others at itself: otherwise any member
		// could send every node's fetches to a host:port of its choosing.
		return "", fmt.Errorf("registry address %q is not on the peer's own address %v", registry, connIP)
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

// validateAgentField rejects values that would break the UserAgent format.
func validateAgentField(name, v string) error {
	if strings.ContainsAny(v, " \t\r\n=") {
		return fmt.Errorf("%s %q must not contain spaces or '='", name, v)
	}
	return nil
}
