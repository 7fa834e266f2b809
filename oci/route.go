package oci

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Limits on request input. Anything larger is rejected before it is parsed.
const (
	MaxNameLength     = 255 // distribution/reference's own bound on a repository name
	MaxRegistryLength = 253 // a DNS name, optionally with a port
	MaxPathLength     = 2048
)

// DefaultRegistry is the registry assumed when a request carries no ?ns=,
// as Docker's registry-mirrors and the conformance suite send none.
const DefaultRegistry = "docker.io"

// Kind says what a route addresses.
type Kind int

// Route kinds.
const (
	KindBase     Kind = iota // /v2/
	KindManifest             // /v2/<name>/manifests/<reference>
	KindBlob                 // /v2/<name>/blobs/<digest>
)

// Route is a parsed distribution-API pull path.
type Route struct {
	Kind Kind
	// Registry is the upstream registry from ?ns=, DefaultRegistry if absent.
	Registry string
	// NS reports whether the request carried ?ns= explicitly.
	NS bool
	// Name is the repository name as sent, e.g. "library/alpine".
	Name string
	// Tag is set for manifests addressed by tag.
	Tag string
	// Digest is set for blobs and for manifests addressed by digest.
	Digest digest.Digest
}

// Reference returns the canonical "registry/name:tag" or "registry/name@digest".
func (r Route) Reference() string {
	if r.Tag != "" {
		return r.Registry + "/" + r.Name + ":" + r.Tag
	}
	return r.Registry + "/" + r.Name + "@" + r.Digest.String()
}

// Anchored forms of distribution/reference's grammar. Its exported
// expressions are unanchored and leftmost-first, so FindString can stop early.
var (
	// anchoredName is the distribution spec's repository name grammar:
	// lowercase path components, no domain (the registry comes from ?ns=).
	anchoredName   = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	anchoredTag    = anchor(reference.TagRegexp)
	anchoredDomain = anchor(reference.DomainRegexp)
)

func anchor(re *regexp.Regexp) *regexp.Regexp { return regexp.MustCompile(`^(?:` + re.String() + `)$`) }

var (
	errNotFound = &Error{Status: http.StatusNotFound, Code: CodeNameUnknown, Message: "unknown route"}
)

// ParseRoute parses a pull request. It rejects anything malformed with an
// *Error that carries the right status: 400 for bad names, digests and
// registries, 404 for unknown routes, 405 for methods other than GET and HEAD.
func ParseRoute(r *http.Request) (Route, error) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return Route{}, ErrUnsupported
	}
	return ParsePath(r.URL.EscapedPath(), r.URL.RawQuery)
}

// ParsePath parses an escaped URL path and raw query.
func ParsePath(escapedPath, rawQuery string) (Route, error) {
	if len(escapedPath) > MaxPathLength || len(rawQuery) > MaxPathLength {
		return Route{}, Errorf(http.StatusRequestURITooLong, CodeNameInvalid, "request URI too long")
	}
	// Escaped characters never occur in a valid route; rejecting them up front
	// means "%2e%2e" and "%2f" cannot smuggle path segments.
	if strings.ContainsAny(escapedPath, "%\\") {
		return Route{}, Errorf(http.StatusBadRequest, CodeNameInvalid, "invalid characters in path")
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return Route{}, Errorf(http.StatusBadRequest, CodeNameInvalid, "malformed query")
	}
	rt := Route{Registry: DefaultRegistry}
	if ns := q["ns"]; len(ns) > 0 {
		if len(ns) > 1 {
			return Route{}, Errorf(http.StatusBadRequest, CodeNameInvalid, "more than one ns parameter")
		}
		reg, err := NormalizeRegistry(ns[0])
		if err != nil {
			return Route{}, err
		}
		rt.Registry, rt.NS = reg, true
	}
	if escapedPath == "/v2" || escapedPath == "/v2/" {
		rt.Kind = KindBase
		return rt, nil
	}
	rest, ok := strings.CutPrefix(escapedPath, "/v2/")
	if !ok {
		return Route{}, errNotFound
	}
	var name, ref string
	if i := strings.LastIndex(rest, "/manifests/"); i > 0 {
		rt.Kind, name, ref = KindManifest, rest[:i], rest[i+len("/manifests/"):]
	} else if i := strings.LastIndex(rest, "/blobs/"); i > 0 {
		rt.Kind, name, ref = KindBlob, rest[:i], rest[i+len("/blobs/"):]
	} else {
		return Route{}, errNotFound
	}
	if err := ValidateName(name); err != nil {
		return Route{}, err
	}
	rt.Name = name
	switch {
	case strings.Contains(ref, ":"):
		d, err := ParseDigest(ref)
		if err != nil {
			return Route{}, err
		}
		rt.Digest = d
	case rt.Kind == KindBlob:
		return Route{}, Errorf(http.StatusBadRequest, CodeDigestInvalid, "blobs are addressed by digest")
	default:
		if len(ref) > 128 || !anchoredTag.MatchString(ref) {
			return Route{}, Errorf(http.StatusBadRequest, CodeManifestInvalid, "invalid tag")
		}
		rt.Tag = ref
	}
	return rt, nil
}

// ValidateName checks a repository name against the distribution grammar and
// length limit. ".." and empty segments fail the grammar.
func ValidateName(name string) error {
	if name == "" || len(name) > MaxNameLength {
		return Errorf(http.StatusBadRequest, CodeNameInvalid, "repository name must be 1 to %d characters", MaxNameLength)
	}
	if !anchoredName.MatchString(name) {
		return Errorf(http.StatusBadRequest, CodeNameInvalid, "invalid repository name")
	}
	return nil
}

// ParseDigest validates a digest string: a registered algorithm and an
// encoded part of the right length and alphabet.
func ParseDigest(s string) (digest.Digest, error) {
	if len(s) > 256 {
		return "", Errorf(http.StatusBadRequest, CodeDigestInvalid, "digest too long")
	}
	d, err := digest.Parse(s)
	if err != nil {
		return "", Errorf(http.StatusBadRequest, CodeDigestInvalid, "invalid digest")
	}
	return d, nil
}

// NormalizeRegistry validates a registry host (optionally host:port) and maps
// Docker Hub's aliases to "docker.io".
func NormalizeRegistry(s string) (string, error) {
	if s == "" || len(s) > MaxRegistryLength {
		return "", Errorf(http.StatusBadRequest, CodeNameInvalid, "ns must be a registry host of 1 to %d characters", MaxRegistryLength)
	}
	s = strings.ToLower(s)
	if !anchoredDomain.MatchString(s) {
		return "", Errorf(http.StatusBadRequest, CodeNameInvalid, "invalid ns registry host")
	}
	switch s {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return DefaultRegistry, nil
	}
	return s, nil
}
