// Command image builds shoal's container image without a Docker daemon: it
// cross-compiles the static binary (CGO_ENABLED=0) for each platform, puts it
// on an empty base with a passwd entry for the non-root user 65532, and writes
// a multi-arch OCI image layout. It is the daemonless twin of the Dockerfile.
//
//	go run ./test/image -o shoal-image --platforms linux/amd64,linux/arm64
//	crane push --index shoal-image ghcr.io/shoal-oci/shoal:dev   (or skopeo copy oci:shoal-image ...)
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// NonRoot is the user and group the image runs as (distroless's "nonroot").
const NonRoot = 65532

// RefName is the image name recorded in the layout's index.json.
const RefName = "ghcr.io/shoal-oci/shoal"

// Config says what to build.
type Config struct {
	// Src is the module root holding main.go.
	Src string
	// Out is the OCI layout directory to write (created; must not hold an index).
	Out string
	// Platforms are os/arch pairs, e.g. linux/amd64.
	Platforms []string
	// Version is stamped into the binary (main.version) and the tag.
	Version string
	// CABundle is a PEM file of trusted roots copied to
	// /etc/ssl/certs/ca-certificates.crt: the cache tier speaks HTTPS to its
	// upstreams, and an empty base has no roots.
	CABundle string
}

func main() {
	var cfg Config
	var platforms string
	flag.StringVar(&cfg.Src, "src", ".", "module root of shoal")
	flag.StringVar(&cfg.Out, "o", "shoal-image", "OCI layout directory to write")
	flag.StringVar(&platforms, "platforms", "linux/amd64,linux/arm64", "comma-separated os/arch list")
	flag.StringVar(&cfg.Version, "version", "dev", "version stamped into the binary")
	flag.StringVar(&cfg.CABundle, "ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "PEM roots to put in the image")
	flag.Parse()
	cfg.Platforms = strings.Split(platforms, ",")
	if err := Build(context.Background(), cfg); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

// Build compiles shoal for every platform and writes the multi-arch image as
// an OCI layout at cfg.Out.
func Build(ctx context.Context, cfg Config) error {
	if len(cfg.Platforms) == 0 {
		return errors.New("no platforms")
	}
	work, err := os.MkdirTemp("", "shoal-image-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(work)

	roots, err := os.ReadFile(cfg.CABundle)
	if err != nil {
		return fmt.Errorf("ca bundle: %w", err)
	}
	var adds []mutate.IndexAddendum
	for _, p := range cfg.Platforms {
		plat, err := v1.ParsePlatform(strings.TrimSpace(p))
		if err != nil {
			return fmt.Errorf("platform %q: %w", p, err)
		}
		bin := filepath.Join(work, plat.OS+"-"+plat.Architecture, "shoal")
		if err := compile(ctx, cfg, *plat, bin); err != nil {
			return err
		}
		// The node binary leaves out the object-storage SDKs and the cache
		// tier, which it never uses: they cost an idle node about 27 and 12
		// MiB of memory.
		nodeBin := bin + "-node"
		if err := compile(ctx, cfg, *plat, nodeBin, "-tags", "nocloud,nocache"); err != nil {
			return err
		}
		img, err := imageFor(bin, nodeBin, roots, *plat)
		if err != nil {
			return err
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: plat}})
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)

	if err := os.MkdirAll(cfg.Out, 0o755); err != nil {
		return fmt.Errorf("layout dir: %w", err)
	}
	lp, err := layout.Write(cfg.Out, empty.Index)
	if err != nil {
		return fmt.Errorf("layout: %w", err)
	}
	ref := RefName + ":" + cfg.Version
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": cfg.Version,
		"io.containerd.image.name":          ref,
	})); err != nil {
		return fmt.Errorf("write index: %w", err)
	}
	return nil
}

func compile(ctx context.Context, cfg Config, plat v1.Platform, out string, extra ...string) error {
	args := append([]string{"build", "-trimpath", "-ldflags", "-s -w -X main.version=" + cfg.Version, "-o", out}, extra...)
	cmd := exec.CommandContext(ctx, "go", append(args, ".")...)
	cmd.Dir = cfg.Src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+plat.OS, "GOARCH="+plat.Architecture)
	if plat.Variant != "" && plat.Architecture == "arm" {
		cmd.Env = append(cmd.Env, "GOARM="+strings.TrimPrefix(plat.Variant, "v"))
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s/%s: %w\n%s", plat.OS, plat.Architecture, err, b)
	}
	return nil
}

// imageFor puts the binaries at /shoal and /shoal-node on an empty base, with /etc/passwd and
// /etc/group naming the non-root user, a world-writable /tmp, and the
// trusted roots, and the entrypoint and user of the Dockerfile.
func imageFor(bin, nodeBin string, roots []byte, plat v1.Platform) (v1.Image, error) {
	exe, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("read binary: %w", err)
	}
	nodeExe, err := os.ReadFile(nodeBin)
	if err != nil {
		return nil, fmt.Errorf("read node binary: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	files := []struct {
		name string
		mode int64
		body []byte
		dir  bool
	}{
		{name: "etc/", mode: 0o755, dir: true},
		{name: "etc/passwd", mode: 0o644, body: []byte(fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRoot, NonRoot))},
		{name: "etc/group", mode: 0o644, body: []byte(fmt.Sprintf("root:x:0:\nnonroot:x:%d:\n", NonRoot))},
		{name: "etc/ssl/", mode: 0o755, dir: true},
		{name: "etc/ssl/certs/", mode: 0o755, dir: true},
		{name: "etc/ssl/certs/ca-certificates.crt", mode: 0o644, body: roots},
		{name: "home/", mode: 0o755, dir: true},
		{name: "home/nonroot/", mode: 0o700, dir: true},
		{name: "tmp/", mode: 0o1777, dir: true},
		{name: "shoal", mode: 0o755, body: exe},
		{name: "shoal-node", mode: 0o755, body: nodeExe},
	}
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: epoch, Format: tar.FormatPAX}
		if f.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.body))
		}
		if f.name == "home/nonroot/" {
			h.Uid, h.Gid = NonRoot, NonRoot
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("tar %s: %w", f.name, err)
		}
		if _, err := tw.Write(f.body); err != nil {
			return nil, fmt.Errorf("tar %s: %w", f.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("tar: %w", err)
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.AppendLayers(img, layer)
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.OS, plat.Architecture, plat.Variant
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{"/shoal"}
	cf.Config.User = fmt.Sprintf("%d:%d", NonRoot, NonRoot)
	cf.Config.WorkingDir = "/"
	cf.Config.Env = []string{"PATH=/", "SSL_CERT_DIR=/etc/ssl/certs"}
	cf.Config.ExposedPorts = map[string]struct{}{"5000/tcp": {}, "5001/tcp": {}, "9090/tcp": {}, "9091/tcp": {}}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.source": "https://github.com/shoal-oci/shoal"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("set config: %w", err)
	}
	return img, nil
}
