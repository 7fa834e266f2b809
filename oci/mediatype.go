package oci

import (
	"encoding/json"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Docker media types that registries still serve.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// MaxManifestSize bounds how much of a manifest any component reads into memory.
const MaxManifestSize = 4 << 20

// IsManifestMediaType reports whether mt names an image manifest or index.
func IsManifestMediaType(mt string) bool {
	switch mt {
	case ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
		MediaTypeDockerManifest, MediaTypeDockerManifestList,
		"application/vnd.docker.distribution.manifest.v1+json",
		"application/vnd.docker.distribution.manifest.v1+prettyjws":
		return true
	}
	return false
}

// IsIndexMediaType reports whether mt names an index or manifest list.
func IsIndexMediaType(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == MediaTypeDockerManifestList
}

// SniffManifestMediaType returns the media type a manifest declares in its
// mediaType field, or infers it from its shape. It returns "" for content
// that is not a manifest.
func SniffManifestMediaType(b []byte) string {
	var m struct {
		SchemaVersion int               `json:"schemaVersion"`
		MediaType     string            `json:"mediaType"`
		Config        json.RawMessage   `json:"config"`
		Layers        json.RawMessage   `json:"layers"`
		Manifests     []json.RawMessage `json:"manifests"`
		FSLayers      json.RawMessage   `json:"fsLayers"`
	}
	if len(b) == 0 || strings.TrimSpace(string(b[:1])) != "{" {
		return ""
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return ""
	}
	if m.MediaType != "" {
		if IsManifestMediaType(m.MediaType) {
			return m.MediaType
		}
		return ""
	}
	switch {
	case m.SchemaVersion == 2 && m.Manifests != nil:
		return ocispec.MediaTypeImageIndex
	case m.SchemaVersion == 2 && m.Config != nil:
		return ocispec.MediaTypeImageManifest
	case m.SchemaVersion == 1 && m.FSLayers != nil:
		return "application/vnd.docker.distribution.manifest.v1+json"
	}
	return ""
}

// ManifestAccept is the Accept header a mirror sends upstream for manifests.
var ManifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	MediaTypeDockerManifestList,
	MediaTypeDockerManifest,
}, ", ")
