package upstream

import (
	"fmt"
	"net/url"
	"strings"
)

// DockerHub is the registry host that names Docker Hub in image references.
const DockerHub = "docker.io"

// dockerHubEndpoint is where Docker Hub's registry API lives.
const dockerHubEndpoint = "https://registry-1.docker.io"

// Registry says how to reach one upstream registry.
type Registry struct {
	// Host is the name in image references, e.g. "docker.io" or "ghcr.io".
	Host string
	// Endpoint is the base URL of the registry API. Empty means
	// https://registry-1.docker.io for docker.io and https://<Host> for any
	// other host. Only scheme and host:port are used.
	Endpoint string
	// Insecure allows plain HTTP. An http:// Endpoint implies it.
	Insecure bool
}

// Config lists the upstream registries that need more than the defaults.
// Hosts that are not listed are reached at https://<host>.
type Config struct {
	Registries map[string]Registry
}

// resolved is a Registry with its endpoint parsed.
type resolved struct {
	host     string // name in references, e.g. docker.io
	scheme   string // http or https
	addr     string // host[:port] of the API endpoint
	insecure bool
}

func (c Config) resolve(host string) (resolved, error) {
	if host == "" || host == "index.docker.io" || host == "registry-1.docker.io" {
		host = DockerHub
	}
	reg, ok := c.Registries[host]
	if !ok {
		reg = Registry{Host: host}
	}
	ep := reg.Endpoint
	if ep == "" {
		ep = "https://" + host
		if host == DockerHub {
			ep = dockerHubEndpoint
		}
		if reg.Insecure {
			ep = "http://" + host
		}
	}
	u, err := url.Parse(ep)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return resolved{}, fmt.Errorf("upstream %s: invalid endpoint %q", host, ep)
	}
	insecure := reg.Insecure || u.Scheme == "http"
	return resolved{host: host, scheme: u.Scheme, addr: u.Host, insecure: insecure}, nil
}

// NormalizeRepo returns the repository name the registry API expects:
// single-name Docker Hub repositories get the "library/" prefix.
func NormalizeRepo(registry, repo string) string {
	repo = strings.Trim(repo, "/")
	switch registry {
	case "", DockerHub, "index.docker.io", "registry-1.docker.io":
		if !strings.Contains(repo, "/") {
			return "library/" + repo
		}
	}
	return repo
}
