package mirror

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
)

const mirrorURL = "http://127.0.0.1:30020"

func testConfig(t *testing.T, regs ...string) Config {
	t.Helper()
	c := DefaultConfig(t.TempDir(), mirrorURL)
	if len(regs) > 0 {
		c.Registries = regs
	}
	return c
}

// writeCA puts a self-signed CA certificate at <dir>/corp.pem, the relative
// path existingConfig names, so that containerd can load it.
func writeCA(t *testing.T, dir string) {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "corp"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "corp.pem"), string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
}

func hostsPath(c Config, reg string) string { return filepath.Join(c.CertsDir, reg, HostsFile) }

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

func write(t *testing.T, p, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// existingConfig is a hosts.toml an operator had before shoal: a corporate
// mirror with a CA and a header, and a custom server.
const existingConfig = `# ours
server = "https://registry-1.docker.io"
skip_verify = false

[host."https://mirror.corp.example"]
  capabilities = ["pull"]
  ca = "corp.pem"
  [host."https://mirror.corp.example".header]
    X-Team = ["infra"]

[host."https://second.example:5000"]
  capabilities = ["pull", "resolve"]
`

// resolve runs containerd's own hosts.toml loader over the certs dir, as
// containerd does for a pull of an image on registry reg.
func resolve(t *testing.T, certsDir, reg string) []docker.RegistryHost {
	t.Helper()
	hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir: config.HostDirFromRoot(certsDir),
	})(reg)
	if err != nil {
		t.Fatalf("containerd ConfigureHosts(%s): %v", reg, err)
	}
	return hosts
}

func hostNames(hs []docker.RegistryHost) []string {
	var out []string
	for _, h := range hs {
		out = append(out, h.Scheme+"://"+h.Host+h.Path)
	}
	return out
}

func TestConfigure(t *testing.T) {
	ctx := context.Background()

	t.Run("fresh_write_has_mirror_and_upstream", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		want := header + `server = "https://registry-1.docker.io"

[host."http://127.0.0.1:30020"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
`
		if got := read(t, hostsPath(c, "docker.io")); got != want {
			t.Fatalf("hosts.toml:\n%s\nwant:\n%s", got, want)
		}
		if exists(hostsPath(c, "docker.io") + BackupSuffix) {
			t.Fatal("backup written for a fresh file")
		}
	})

	t.Run("default_registries_get_their_upstream", func(t *testing.T) {
		c := testConfig(t)
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		for _, reg := range DefaultRegistries {
			got := read(t, hostsPath(c, reg))
			if !strings.Contains(got, "server = \""+Upstream(reg)+"\"\n") {
				t.Errorf("%s: server is not %s:\n%s", reg, Upstream(reg), got)
			}
		}
		if Upstream("ghcr.io") != "https://ghcr.io" {
			t.Errorf("Upstream(ghcr.io) = %s", Upstream("ghcr.io"))
		}
	})

	t.Run("registries_override_writes_only_those", func(t *testing.T) {
		c := testConfig(t, "registry.example:5000")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		entries, err := os.ReadDir(c.CertsDir)
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 1 || entries[0].Name() != "registry.example:5000" {
			t.Fatalf("certs dir holds %v, want only registry.example:5000", entries)
		}
		hs := resolve(t, c.CertsDir, "registry.example:5000")
		if got := hostNames(hs); !slices.Equal(got, []string{mirrorURL + "/v2", "https://registry.example:5000/v2"}) {
			t.Fatalf("hosts = %v", got)
		}
	})

	t.Run("second_run_is_byte_identical_and_makes_no_backup", func(t *testing.T) {
		c := testConfig(t, "quay.io")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		first := read(t, hostsPath(c, "quay.io"))
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		if second := read(t, hostsPath(c, "quay.io")); second != first {
			t.Fatalf("second run changed the file:\n%s\nvs\n%s", first, second)
		}
		if exists(hostsPath(c, "quay.io") + BackupSuffix) {
			t.Fatal("shoal backed up its own file")
		}
	})

	t.Run("existing_config_is_backed_up_and_kept_as_fallback", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		p := hostsPath(c, "docker.io")
		write(t, p, existingConfig)
		writeCA(t, filepath.Dir(p))
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		if got := read(t, p+BackupSuffix); got != existingConfig {
			t.Fatalf("backup = %q, want the original", got)
		}
		first := read(t, p)
		if !isShoal([]byte(first)) {
			t.Fatalf("file lacks the shoal marker:\n%s", first)
		}
		hs := resolve(t, c.CertsDir, "docker.io")
		want := []string{mirrorURL + "/v2", "https://mirror.corp.example/v2", "https://second.example:5000/v2", "https://registry-1.docker.io/v2"}
		if got := hostNames(hs); !slices.Equal(got, want) {
			t.Fatalf("containerd hosts = %v, want %v\nfile:\n%s", got, want, first)
		}
		if got := hs[1].Header.Get("X-Team"); got != "infra" {
			t.Errorf("carried-over header X-Team = %q, want infra", got)
		}
		if hs[1].Capabilities != docker.HostCapabilityPull {
			t.Errorf("carried-over capabilities = %v, want pull only", hs[1].Capabilities)
		}

		// Again: same bytes, and the backup still holds the operator's file.
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		if got := read(t, p); got != first {
			t.Fatalf("second run changed the file:\n%s\nvs\n%s", first, got)
		}
		if got := read(t, p+BackupSuffix); got != existingConfig {
			t.Fatalf("second run overwrote the backup with %q", got)
		}
	})

	t.Run("existing_server_is_kept", func(t *testing.T) {
		c := testConfig(t, "ghcr.io")
		write(t, hostsPath(c, "ghcr.io"), "server = \"https://ghcr-proxy.internal\"\n")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		hs := resolve(t, c.CertsDir, "ghcr.io")
		if got := hostNames(hs); !slices.Equal(got, []string{mirrorURL + "/v2", "https://ghcr-proxy.internal/v2"}) {
			t.Fatalf("hosts = %v", got)
		}
	})

	t.Run("changed_mirror_url_replaces_the_old_one", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		write(t, hostsPath(c, "docker.io"), existingConfig)
		writeCA(t, filepath.Join(c.CertsDir, "docker.io"))
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		c.MirrorURL = "http://127.0.0.1:30021"
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		got := hostNames(resolve(t, c.CertsDir, "docker.io"))
		want := []string{"http://127.0.0.1:30021/v2", "https://mirror.corp.example/v2", "https://second.example:5000/v2", "https://registry-1.docker.io/v2"}
		if !slices.Equal(got, want) {
			t.Fatalf("hosts = %v, want %v", got, want)
		}
	})

	t.Run("existing_entry_for_the_mirror_is_not_duplicated", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		write(t, hostsPath(c, "docker.io"), "[host.\""+mirrorURL+"\"]\ncapabilities = [\"pull\"]\n")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		hs := resolve(t, c.CertsDir, "docker.io")
		if got := hostNames(hs); !slices.Equal(got, []string{mirrorURL + "/v2", "https://registry-1.docker.io/v2"}) {
			t.Fatalf("hosts = %v", got)
		}
	})

	t.Run("resolve_tags_off_gives_pull_only", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		c.ResolveTags = false
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		hs := resolve(t, c.CertsDir, "docker.io")
		if hs[0].Capabilities != docker.HostCapabilityPull {
			t.Fatalf("mirror capabilities = %v, want pull only", hs[0].Capabilities)
		}
	})

	t.Run("negative_dial_timeout_leaves_the_key_out", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		c.DialTimeout = -1
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		if got := read(t, hostsPath(c, "docker.io")); strings.Contains(got, "dial_timeout") {
			t.Fatalf("dial_timeout written:\n%s", got)
		}
	})

	t.Run("no_temp_files_left_behind", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		write(t, hostsPath(c, "docker.io"), existingConfig)
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		entries, _ := os.ReadDir(filepath.Join(c.CertsDir, "docker.io"))
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if !slices.Equal(names, []string{HostsFile, HostsFile + BackupSuffix}) { // sorted by name
			t.Fatalf("dir holds %v", names)
		}
	})
}

func TestConfigureRejectsBadConfig(t *testing.T) {
	tests := map[string]Config{
		"empty_certs_dir":     {MirrorURL: mirrorURL},
		"mirror_without_host": {CertsDir: t.TempDir(), MirrorURL: "http://"},
		"mirror_not_http":     {CertsDir: t.TempDir(), MirrorURL: "ftp://127.0.0.1:1"},
		"registry_with_slash": {CertsDir: t.TempDir(), MirrorURL: mirrorURL, Registries: []string{"../etc"}},
		"registry_is_dot_dot": {CertsDir: t.TempDir(), MirrorURL: mirrorURL, Registries: []string{".."}},
		"registry_empty_name": {CertsDir: t.TempDir(), MirrorURL: mirrorURL, Registries: []string{""}},
	}
	for name, c := range tests {
		t.Run(name, func(t *testing.T) {
			if err := Configure(context.Background(), c); err == nil {
				t.Fatal("Configure accepted a bad config")
			}
		})
	}
}

func TestConfigureRejectsUnparsableExistingFile(t *testing.T) {
	c := testConfig(t, "docker.io")
	p := hostsPath(c, "docker.io")
	write(t, p, "this is = = not toml")
	if err := Configure(context.Background(), c); err == nil {
		t.Fatal("Configure accepted a broken hosts.toml")
	}
	// The operator's file is untouched, and nothing else was written.
	if got := read(t, p); got != "this is = = not toml" {
		t.Fatalf("file changed to %q", got)
	}
	if exists(p + BackupSuffix) {
		t.Fatal("backup written for a file that was not replaced")
	}
}

func TestRemove(t *testing.T) {
	ctx := context.Background()

	t.Run("restores_the_backup", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		p := hostsPath(c, "docker.io")
		write(t, p, existingConfig)
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		if err := Remove(ctx, c); err != nil {
			t.Fatal(err)
		}
		if got := read(t, p); got != existingConfig {
			t.Fatalf("after Remove: %q, want the original", got)
		}
		if exists(p + BackupSuffix) {
			t.Fatal("backup left behind")
		}
	})

	t.Run("deletes_shoal_file_and_empty_dir", func(t *testing.T) {
		c := testConfig(t, "docker.io", "ghcr.io")
		if err := Configure(ctx, c); err != nil {
			t.Fatal(err)
		}
		cert := filepath.Join(c.CertsDir, "ghcr.io", "ca.crt")
		write(t, cert, "cert")
		if err := Remove(ctx, c); err != nil {
			t.Fatal(err)
		}
		if exists(filepath.Join(c.CertsDir, "docker.io")) {
			t.Fatal("empty docker.io dir left behind")
		}
		if exists(hostsPath(c, "ghcr.io")) {
			t.Fatal("shoal's ghcr.io hosts.toml left behind")
		}
		if !exists(cert) {
			t.Fatal("Remove deleted a certificate it did not write")
		}
	})

	t.Run("never_deletes_a_foreign_file", func(t *testing.T) {
		c := testConfig(t, "docker.io")
		p := hostsPath(c, "docker.io")
		write(t, p, existingConfig)
		if err := Remove(ctx, c); err != nil {
			t.Fatal(err)
		}
		if got := read(t, p); got != existingConfig {
			t.Fatalf("Remove changed a foreign file to %q", got)
		}
	})

	t.Run("is_a_no_op_when_nothing_is_there", func(t *testing.T) {
		c := testConfig(t)
		if err := Remove(ctx, c); err != nil {
			t.Fatal(err)
		}
		entries, err := os.ReadDir(c.CertsDir)
		if err != nil || len(entries) != 0 {
			t.Fatalf("certs dir: %v %v", entries, err)
		}
	})
}

// TestContainerdReadsShoalFile runs containerd's own hosts.toml loader (the
// code path the CRI and transfer plugins use) over what Configure wrote: the
// mirror must come first with pull and resolve, the real upstream last.
func TestContainerdReadsShoalFile(t *testing.T) {
	c := testConfig(t)
	if err := Configure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	for _, reg := range DefaultRegistries {
		t.Run(reg, func(t *testing.T) {
			hs := resolve(t, c.CertsDir, reg)
			if len(hs) != 2 {
				t.Fatalf("got %d hosts %v, want mirror and upstream", len(hs), hostNames(hs))
			}
			m, up := hs[0], hs[1]
			if m.Scheme != "http" || m.Host != "127.0.0.1:30020" || m.Path != "/v2" {
				t.Errorf("first host = %s, want the mirror", hostNames(hs[:1]))
			}
			if m.Capabilities != docker.HostCapabilityPull|docker.HostCapabilityResolve {
				t.Errorf("mirror capabilities = %v, want pull|resolve", m.Capabilities)
			}
			if got, want := up.Scheme+"://"+up.Host, Upstream(reg); got != want {
				t.Errorf("last host = %s, want %s", got, want)
			}
			if !up.Capabilities.Has(docker.HostCapabilityPull | docker.HostCapabilityResolve) {
				t.Errorf("upstream capabilities = %v", up.Capabilities)
			}
		})
	}
}

// TestRenderEscapesKeys checks that odd host names survive a round trip.
func TestRenderEscapesKeys(t *testing.T) {
	hf, err := parseHostsFile([]byte("[host.\"https://a.example/with \\\"quote\\\"\"]\ncapabilities = ['pull']\n"))
	if err != nil {
		t.Fatal(err)
	}
	c, _ := testConfig(t).withDefaults()
	out, err := render(c, "docker.io", hf)
	if err != nil {
		t.Fatal(err)
	}
	back, err := parseHostsFile(out)
	if err != nil {
		t.Fatalf("re-parse: %v\n%s", err, out)
	}
	if len(back.hosts) != 2 || back.hosts[1].name != `https://a.example/with "quote"` {
		t.Fatalf("round trip lost the host name:\n%s", out)
	}
	if !bytes.HasPrefix(out, []byte(Marker)) {
		t.Fatal("no marker")
	}
}
