// Package containerd implements the node's Store on containerd: image
// records say what is served, the content store holds the bytes, and the
// event stream (plus a poll for containerd 1.7) keeps the advertised keys
// current. Only content reachable from an image record is served.
package containerd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/node/store"
)

// Defaults for Config.
const (
	DefaultNamespace    = "k8s.io"
	DefaultPollInterval = 10 * time.Second
	// contentPluginDir is where containerd's content plugin keeps its root,
	// relative to containerd's root directory.
	contentPluginDir = "io.containerd.content.v1.content"
)

// Config configures a Store.
type Config struct {
	// Address is containerd's gRPC socket.
	Address string
	// Namespace is the containerd namespace to serve (default "k8s.io").
	Namespace string
	// ContentDir is the content plugin's directory, whose blobs/<alg>/<hex>
	// files Open returns directly. Empty: learn it from containerd's
	// introspection service; when that path is not on this filesystem, Open
	// reads through the content API instead.
	ContentDir string
	// ConfigPath is containerd's config.toml. Optional: CheckConfig reads it
	// for settings that containerd does not expose over its API.
	ConfigPath string
	// PollInterval is how often the full image list is rescanned, which
	// catches what events miss (containerd 1.7, garbage collection).
	// Default 10s.
	PollInterval time.Duration
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives the store's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Store serves the content of containerd's images.
type Store struct {
	client     *client.Client
	cs         content.Store
	ns         string
	contentDir string
	configPath string
	poll       time.Duration
	log        *slog.Logger
	metrics    *metrics

	mu       sync.Mutex // guards the scan state below
	images   map[string]*imageRecord
	present  map[digest.Digest]bool
	children map[digest.Digest][]ocispec.Descriptor

	viewMu sync.RWMutex
	view   *store.View
}

// New connects to containerd, scans its images, and checks its config
// (logging problems loudly). containerd must be reachable.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Address == "" {
		return nil, errors.New("containerd store: no address")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = DefaultNamespace
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("containerd store: metrics: %w", err)
	}
	c, err := client.New(cfg.Address, client.WithDefaultNamespace(cfg.Namespace), client.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("containerd store: connect %s: %w", cfg.Address, err)
	}
	s := &Store{
		client:     c,
		cs:         c.ContentStore(),
		ns:         cfg.Namespace,
		contentDir: cfg.ContentDir,
		configPath: cfg.ConfigPath,
		poll:       cfg.PollInterval,
		log:        cfg.Logger.With("store", "containerd", "namespace", cfg.Namespace),
		metrics:    m,
		images:     map[string]*imageRecord{},
		present:    map[digest.Digest]bool{},
		children:   map[digest.Digest][]ocispec.Descriptor{},
		view:       store.NewView(),
	}
	ctx = s.nsCtx(ctx)
	if s.contentDir == "" {
		s.contentDir = s.discoverContentDir(ctx)
	}
	if err := s.rescan(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("containerd store: initial scan: %w", err)
	}
	for _, p := range s.CheckConfig(ctx) {
		s.log.Warn("containerd config problem: shoal will not work as intended until it is fixed",
			"problem", p.Name, "detail", p.Detail)
	}
	s.log.Info("containerd store ready", "address", cfg.Address, "content_dir", s.contentDir,
		"keys", len(s.currentView().Keys))
	return s, nil
}

// Close closes the connection to containerd.
func (s *Store) Close() error { return s.client.Close() }

// ContentDir is the directory Open reads blob files from ("" when none).
func (s *Store) ContentDir() string { return s.contentDir }

func (s *Store) nsCtx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, s.ns)
}

// discoverContentDir asks containerd's introspection service where its
// content plugin keeps its root, and keeps the answer only when that
// directory exists here.
func (s *Store) discoverContentDir(ctx context.Context) string {
	resp, err := s.client.IntrospectionService().Plugins(ctx, `type=="io.containerd.content.v1",id=="content"`)
	if err != nil {
		s.log.Debug("introspection failed; reading content through the API", "err", err)
		return ""
	}
	for _, p := range resp.GetPlugins() {
		root := p.GetExports()["root"]
		if root == "" {
			continue
		}
		if st, err := os.Stat(root); err == nil && st.IsDir() {
			return root
		}
		// A fresh containerd creates its content dir with the first blob; if
		// its parent is here, the dir will be too (Open falls back anyway).
		if st, err := os.Stat(filepath.Dir(root)); err == nil && st.IsDir() {
			return root
		}
		s.log.Info("containerd content dir not visible here; reading content through the API", "dir", root)
	}
	return ""
}

// Resolve maps a tag reference to the digest its image record points to.
func (s *Store) Resolve(_ context.Context, ref string) (digest.Digest, error) {
	return s.currentView().Resolve(ref)
}

// Stat describes content that an image references and containerd holds.
func (s *Store) Stat(_ context.Context, dgst digest.Digest) (ocispec.Descriptor, error) {
	return s.currentView().Stat(dgst)
}

// Open returns the content: the blob file itself when it is readable here,
// else a reader over containerd's content API.
func (s *Store) Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error) {
	desc, ok := s.currentView().Digests[dgst]
	if !ok {
		return nil, fmt.Errorf("open %s: %w", dgst, store.ErrNotFound)
	}
	if s.contentDir != "" && dgst.Validate() == nil {
		f, err := os.Open(filepath.Join(s.contentDir, "blobs", dgst.Algorithm().String(), dgst.Encoded()))
		if err == nil {
			return f, nil
		}
		s.log.Debug("blob file not readable; using the content API", "digest", dgst, "err", err)
	}
	ra, err := s.cs.ReaderAt(s.nsCtx(ctx), desc)
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("open %s: %w", dgst, store.ErrNotFound)
		}
		return nil, fmt.Errorf("open %s: %w", dgst, err)
	}
	return &sectionCloser{SectionReader: io.NewSectionReader(ra, 0, ra.Size()), ra: ra}, nil
}

// sectionCloser is a seekable reader over a content.ReaderAt.
type sectionCloser struct {
	*io.SectionReader
	ra content.ReaderAt
}

func (r *sectionCloser) Close() error { return r.ra.Close() }
