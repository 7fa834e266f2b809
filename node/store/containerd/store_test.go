package containerd

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/node/store/storetest"
	"github.com/shoal-oci/shoal/test/harness"
)

var versions = []harness.ContainerdVersion{harness.ContainerdV2, harness.ContainerdV17}

func newStore(t *testing.T, c *harness.Containerd, mod func(*Config)) (*Store, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := Config{
		Address:      c.Socket,
		PollInterval: 200 * time.Millisecond,
		Logger:       slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer:   reg,
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, reg
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func TestConformance(t *testing.T) {
	for _, v := range versions {
		t.Run(v.String(), func(t *testing.T) {
			c := harness.StartContainerd(t, v)
			img := harness.RandomImage(t, 2, 1024)
			c.Import(t, harness.WriteOCILayoutTar(t, img, "docker.io/library/conf:1"))
			idx := harness.RandomIndex(t, "amd64", "arm64")
			c.Import(t, harness.WriteOCIIndexLayoutTar(t, idx, "ghcr.io/shoal/multi:2"))

			s, _ := newStore(t, c, nil)
			if want := filepath.Join(c.Root, "io.containerd.content.v1.content"); s.ContentDir() != want {
				t.Errorf("ContentDir = %q, want %q (from introspection)", s.ContentDir(), want)
			}
			t.Run("image", func(t *testing.T) {
				fx := storetest.ImageFixture(t, "docker.io/library/conf:1", img)
				fx.WantFile = true
				storetest.Conformance(t, s, fx)
			})
			t.Run("index", func(t *testing.T) {
				fx := storetest.IndexFixture(t, "ghcr.io/shoal/multi:2", idx, 1)
				fx.WantFile = true
				storetest.Conformance(t, s, fx)
			})
			t.Run("through_content_api", func(t *testing.T) {
				s, _ := newStore(t, c, func(cfg *Config) { cfg.ContentDir = filepath.Join(t.TempDir(), "elsewhere") })
				storetest.Conformance(t, s, storetest.ImageFixture(t, "docker.io/library/conf:1", img))
			})
		})
	}
}

// keysOf lists what a store must advertise for img under tag.
func keysOf(t *testing.T, tag string, img v1.Image) []string {
	return storetest.ImageFixture(t, tag, img).Keys()
}

// next waits for the next event of kind.
func next(t *testing.T, ch <-chan store.Event, kind store.EventKind) store.Event {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev := <-ch:
			if ev.Kind == kind {
				return ev
			}
			t.Logf("skipping event %v %v", ev.Kind, ev.Keys)
		case <-timeout:
			t.Fatalf("no event of kind %v within 10s", kind)
		}
	}
}

// collect gathers keys of events of kind until all of want arrived.
func collect(t *testing.T, ch <-chan store.Event, kind store.EventKind, want []string) []string {
	t.Helper()
	var got []string
	timeout := time.After(10 * time.Second)
	for {
		missing := slices.DeleteFunc(slices.Clone(want), func(k string) bool { return slices.Contains(got, k) })
		if len(missing) == 0 {
			return got
		}
		select {
		case ev := <-ch:
			if ev.Kind == kind {
				got = append(got, ev.Keys...)
			} else {
				t.Logf("other event %v %v", ev.Kind, ev.Keys)
			}
		case <-timeout:
			t.Fatalf("event kind %v: missing %v within 10s (got %v)", kind, missing, got)
		}
	}
}

func TestWatchFollowsImages(t *testing.T) {
	for _, v := range versions {
		t.Run(v.String(), func(t *testing.T) {
			c := harness.StartContainerd(t, v)
			s, reg := newStore(t, c, nil)
			ctx, cancel := context.WithCancel(context.Background())
			ch := make(chan store.Event, 64)
			done := make(chan error, 1)
			go func() { done <- s.Watch(ctx, ch) }()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Watch returned %v after cancel, want nil", err)
				}
			})

			if ev := next(t, ch, store.Snapshot); len(ev.Keys) != 0 {
				t.Fatalf("snapshot of an empty containerd = %v, want none", ev.Keys)
			}

			shared := harness.RandomLayer(t, 512)
			a := harness.ImageWithLayers(t, shared, harness.RandomLayer(t, 512))
			b := harness.ImageWithLayers(t, shared, harness.RandomLayer(t, 512))
			keysA := keysOf(t, "docker.io/library/a:1", a)
			keysB := keysOf(t, "docker.io/library/b:1", b)

			t.Run("image_imported_after_start_is_added_with_its_tag", func(t *testing.T) {
				c.Import(t, harness.WriteOCILayoutTar(t, a, "a:1"))
				c.Import(t, harness.WriteOCILayoutTar(t, b, "docker.io/library/b:1"))
				collect(t, ch, store.Added, append(slices.Clone(keysA), keysB...))
				if d, err := s.Resolve(ctx, "docker.io/library/a:1"); err != nil || d.String() != keysA[1] {
					t.Fatalf("Resolve(a:1) = %s, %v; want %s", d, err, keysA[1])
				}
				if got := testutil.ToFloat64(s.metrics.keys); got != float64(len(keysA)+len(keysB)-1) {
					t.Errorf("shoal_store_keys = %v, want %d", got, len(keysA)+len(keysB)-1)
				}
			})

			t.Run("deleted_image_withdraws_keys_not_shared", func(t *testing.T) {
				c.Ctr(t, "images", "rm", "--sync", "a:1")
				removed := collect(t, ch, store.Removed, exclude(keysA, sharedKey(t, shared)))
				if slices.Contains(removed, sharedKey(t, shared)) {
					t.Fatalf("removed %v includes the layer b still uses", removed)
				}
				if _, err := s.Resolve(ctx, "docker.io/library/a:1"); !errors.Is(err, store.ErrNotFound) {
					t.Fatalf("Resolve(deleted) error = %v, want ErrNotFound", err)
				}
				if _, err := s.Stat(ctx, mustDigest(t, shared)); err != nil {
					t.Fatalf("Stat(shared layer) = %v, want found", err)
				}
			})

			t.Run("layer_removed_from_content_store_is_withdrawn", func(t *testing.T) {
				only := keysB[len(keysB)-1]
				c.Ctr(t, "content", "rm", only)
				collect(t, ch, store.Removed, []string{only})
				if _, err := s.Stat(ctx, digest.Digest(only)); !errors.Is(err, store.ErrNotFound) {
					t.Fatalf("Stat(discarded layer) error = %v, want ErrNotFound", err)
				}
			})

			t.Run("restart_resubscribes_and_sends_snapshot", func(t *testing.T) {
				c.Restart(t)
				ev := next(t, ch, store.Snapshot)
				for _, k := range keysB[:len(keysB)-1] {
					if !slices.Contains(ev.Keys, k) {
						t.Errorf("snapshot after restart lacks %s", k)
					}
				}
				if got := testutil.ToFloat64(s.metrics.resubscribes); got < 1 {
					t.Errorf("shoal_store_resubscribes_total = %v, want >= 1", got)
				}
				// Events still flow after the restart.
				c.Import(t, harness.WriteOCILayoutTar(t, a, "docker.io/library/a:2"))
				collect(t, ch, store.Added, []string{"docker.io/library/a:2"})
			})
			if n := testutil.CollectAndCount(reg, "shoal_store_keys"); n != 1 {
				t.Errorf("shoal_store_keys registered %d times, want 1", n)
			}
		})
	}
}

func sharedKey(t *testing.T, l v1.Layer) string { return mustDigest(t, l).String() }

func exclude(keys []string, drop string) []string {
	return slices.DeleteFunc(slices.Clone(keys), func(k string) bool { return k == drop })
}

func TestConfigCheck(t *testing.T) {
	c := harness.StartContainerd(t, harness.ContainerdV2)
	t.Run("harness_config_has_no_problems", func(t *testing.T) {
		s, reg := newStore(t, c, func(cfg *Config) { cfg.ConfigPath = c.ConfigPath })
		if ps := s.CheckConfig(context.Background()); len(ps) != 0 {
			t.Fatalf("problems = %v, want none", ps)
		}
		if n := testutil.CollectAndCount(reg, "shoal_containerd_config_problem"); n != len(allProblems) {
			t.Fatalf("config problem series = %d, want %d", n, len(allProblems))
		}
	})
	t.Run("missing_transfer_config_path_is_reported", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(p, []byte("version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		s, _ := newStore(t, c, func(cfg *Config) { cfg.ConfigPath = p })
		ps := s.CheckConfig(context.Background())
		if len(ps) != 1 || ps[0].Name != ProblemTransferConfigPathUnset {
			t.Fatalf("problems = %v, want only %s", ps, ProblemTransferConfigPathUnset)
		}
		if got := testutil.ToFloat64(s.metrics.configProblem.WithLabelValues(ProblemTransferConfigPathUnset)); got != 1 {
			t.Fatalf("gauge = %v, want 1", got)
		}
	})
}

func mustDigest(t *testing.T, l v1.Layer) digest.Digest {
	t.Helper()
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(d.String())
}
