package main

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/shoal-oci/shoal/test/harness"
)

// TestImageLayout builds the image for this machine's architecture as an OCI
// layout and checks what a runtime would run: the static binary at the
// entrypoint, a non-root user that /etc/passwd names, and the CA roots.
func TestImageLayout(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the shoal binary")
	}
	if _, err := os.Stat("/etc/ssl/certs/ca-certificates.crt"); err != nil {
		harness.Missing(t, "no CA bundle at /etc/ssl/certs/ca-certificates.crt (Debian package ca-certificates)")
	}
	out := filepath.Join(t.TempDir(), "layout")
	plat := "linux/" + runtime.GOARCH
	if err := Build(context.Background(), Config{
		Src: "../..", Out: out, Platforms: []string{plat}, Version: "v0.0.0-test",
		CABundle: "/etc/ssl/certs/ca-certificates.crt",
	}); err != nil {
		t.Fatal(err)
	}

	lp, err := layout.FromPath(out)
	if err != nil {
		t.Fatalf("read layout: %v", err)
	}
	top, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	topm, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(topm.Manifests) != 1 {
		t.Fatalf("index.json holds %d entries, want 1", len(topm.Manifests))
	}
	if got := topm.Manifests[0].Annotations["io.containerd.image.name"]; got != RefName+":v0.0.0-test" {
		t.Errorf("image name annotation = %q", got)
	}
	idx, err := top.ImageIndex(topm.Manifests[0].Digest)
	if err != nil {
		t.Fatalf("multi-arch index: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Platform == nil || im.Manifests[0].Platform.String() != plat {
		t.Fatalf("platform manifests = %+v, want one for %s", im.Manifests, plat)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cf.Config.Entrypoint, " "); got != "/shoal" {
		t.Errorf("entrypoint = %q, want /shoal", got)
	}
	if cf.Config.User != "65532:65532" {
		t.Errorf("user = %q, want 65532:65532", cf.Config.User)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("config platform = %s/%s", cf.OS, cf.Architecture)
	}

	files := flatten(t, img)
	if nb, ok := files["shoal-node"]; !ok || nb.mode&0o111 == 0 {
		t.Errorf("no executable /shoal-node (the node binary) in the image")
	}
	bin, ok := files["shoal"]
	if !ok {
		t.Fatalf("no /shoal in the image; files: %v", keys(files))
	}
	if bin.mode&0o111 == 0 {
		t.Errorf("/shoal mode %o is not executable", bin.mode)
	}
	if !strings.HasPrefix(string(bin.head), "\x7fELF") {
		t.Errorf("/shoal is not an ELF binary")
	}
	if strings.Contains(string(bin.body), "/lib64/ld-linux") || strings.Contains(string(bin.body), "/lib/ld-musl") {
		t.Errorf("/shoal names a dynamic loader: it is not static (CGO_ENABLED=0)")
	}
	if !strings.Contains(string(files["etc/passwd"].body), ":65532:65532:") {
		t.Errorf("/etc/passwd has no user 65532: %q", files["etc/passwd"].body)
	}
	if !strings.Contains(string(files["etc/ssl/certs/ca-certificates.crt"].body), "BEGIN CERTIFICATE") {
		t.Errorf("no CA roots in the image")
	}
	if tmp, ok := files["tmp"]; !ok || tmp.mode&0o1777 != 0o1777 {
		t.Errorf("/tmp missing or not 1777")
	}
}

type file struct {
	mode int64
	head []byte
	body []byte
}

func flatten(t *testing.T, img v1.Image) map[string]file {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]file{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			f := file{mode: h.Mode, body: b}
			if len(b) >= 4 {
				f.head = b[:4]
			}
			files[strings.TrimSuffix(strings.TrimPrefix(h.Name, "/"), "/")] = f
		}
		rc.Close()
	}
	return files
}

func keys(m map[string]file) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
