package node

import (
	"errors"
	"net/http"

	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// A source is one place a request's content can come from: this node's
// store, the peers that hold it, or the cache tier. The handler's policy is
// an ordered list of sources per kind of request (policyFor).
type source interface {
	// name labels the source in metrics and logs.
	name() string
	// serve answers r from the source. It returns errNoSource when the
	// source does not hold the content and nothing was written, so that the
	// next source is tried. Any other error is the source's answer; the
	// policy says whether a later source may still try.
	serve(w http.ResponseWriter, r *http.Request, rt oci.Route) error
}

// step is one source in a policy.
type step struct {
	src source
	// soft, when set, says which of src's errors are not an answer but the
	// source being unable to give one (the cache tier down or erroring):
	// the next source tries, and the error is passed on only if none of
	// them can answer.
	soft func(error) bool
}

// requestKind is what decides which sources a request tries.
type requestKind int

const (
	fromPeerRequest requestKind = iota // a peer's request, digest or tag
	digestRequest
	tagRequest
	numRequestKinds
)

func kindOf(rt oci.Route, fromPeer bool) requestKind {
	switch {
	case fromPeer:
		return fromPeerRequest
	case rt.Tag != "":
		return tagRequest
	default:
		return digestRequest
	}
}

// policyFor returns the sources a kind of request tries, in order.
//
//   - A peer's request: this node's store, or the blob as its containerd
//     is receiving it (herd.go); never a relay onward.
//   - A digest: the store, then the peers that hold it (several at once for
//     a large blob; a transfer broken mid-stream resumes on the others, then
//     on the cache tier), then the cache tier.
//   - A tag: tags are mutable, so the cache tier decides when there is one;
//     only when it cannot answer do the store and, inside a PSK network,
//     the peers count. A tag resolves only from a trusted source: any DHT
//     member could answer a tag with an image of its choosing, and every
//     digest check would pass.
func (n *Node) policyFor(k requestKind) []step {
	local := step{src: localSource{n}}
	cacheTier := n.cfg.CacheURL != ""
	var steps []step
	switch k {
	case fromPeerRequest:
		return []step{local, {src: inflightSource{n}}}
	case tagRequest:
		if cacheTier {
			steps = append(steps, step{src: cacheSource{n}, soft: func(err error) bool { return !authoritative(err) }})
		}
		steps = append(steps, local)
		if n.cfg.TrustPeerTags {
			steps = append(steps, step{src: peerSource{n}})
		}
		return steps
	}
	steps = append(steps, local, step{src: peerSource{n}})
	if cacheTier {
		steps = append(steps, step{src: cacheSource{n}})
	}
	return steps
}

// serveFrom tries the steps in order and returns the name of the source
// that answered.
func (n *Node) serveFrom(w http.ResponseWriter, r *http.Request, rt oci.Route, steps []step) (string, error) {
	var softErr error
	for _, s := range steps {
		err := s.src.serve(w, r, rt)
		switch {
		case err == nil:
			return s.src.name(), nil
		case errors.Is(err, errNoSource):
		case s.soft != nil && s.soft(err):
			if softErr == nil {
				softErr = err
			}
			n.cfg.Logger.InfoContext(r.Context(), "source could not answer, trying the next", "source", s.src.name(), "ref", rt.Reference(), "err", err)
		default:
			return "", err
		}
	}
	if softErr != nil {
		return "", softErr
	}
	return "", unknown(rt)
}

// unknown is the OCI error for content that no source holds.
func unknown(rt oci.Route) error {
	if rt.Kind == oci.KindManifest {
		return oci.ErrManifestUnknown
	}
	return oci.ErrBlobUnknown
}

// authoritative reports whether a cache-tier error is a real answer (the
// manifest does not exist, the request is malformed) rather than the tier
// being unable to answer (down, rate-limited, erroring).
func authoritative(err error) bool {
	var oe *oci.Error
	if !errors.As(err, &oe) {
		return false
	}
	return oe.Status == http.StatusNotFound || oe.Status == http.StatusBadRequest
}

// localSource is this node's store (containerd's content store, or a
// layout).
type localSource struct{ n *Node }

func (localSource) name() string { return sourceLocal }

func (s localSource) serve(w http.ResponseWriter, r *http.Request, rt oci.Route) error {
	ctx := r.Context()
	d := rt.Digest
	if rt.Tag != "" {
		var err error
		if d, err = s.n.cfg.Store.Resolve(ctx, rt.Reference()); err != nil {
			return s.miss(r, rt, err)
		}
	}
	desc, err := s.n.cfg.Store.Stat(ctx, d)
	if err != nil {
		return s.miss(r, rt, err)
	}
	return s.n.serveLocal(w, r, rt, desc)
}

// miss turns a store error into errNoSource, logging any but "not found".
func (s localSource) miss(r *http.Request, rt oci.Route, err error) error {
	if !errors.Is(err, store.ErrNotFound) {
		s.n.cfg.Logger.WarnContext(r.Context(), "local store", "ref", rt.Reference(), "digest", rt.Digest, "err", err)
	}
	return errNoSource
}

// peerSource is the peers that hold the content, found through the router:
// one, hedged, or several at once for a large blob (stripe.go).
type peerSource struct{ n *Node }

func (peerSource) name() string { return sourcePeer }

func (s peerSource) serve(w http.ResponseWriter, r *http.Request, rt oci.Route) error {
	key := rt.Digest.String()
	if rt.Tag != "" {
		key = rt.Reference()
	}
	return s.n.relayPeers(w, r, rt, key)
}

// cacheSource is the cache tier. Its 404 is an answer (unknown), not a
// reason to try elsewhere.
type cacheSource struct{ n *Node }

func (cacheSource) name() string { return sourceCache }

func (s cacheSource) serve(w http.ResponseWriter, r *http.Request, rt oci.Route) error {
	err := s.n.relay(w, r, rt, s.n.cacheTargets(), nil, sourceCache)
	if rs := receiversOf(err); rs != nil {
		err = s.n.relayReceivers(w, r, rt, rs)
	}
	if errors.Is(err, errNoSource) {
		return unknown(rt)
	}
	return err
}
