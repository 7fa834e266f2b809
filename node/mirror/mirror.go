// Package mirror writes containerd hosts.toml files that make containerd pull
// through the local shoal node, and removes them again. It keeps whatever was
// configured before: an existing file is backed up, and its hosts stay in the
// new file as fallbacks after the shoal mirror.
package mirror

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const (
	// HostsFile is the name of the file containerd reads in each registry
	// directory of its config_path.
	HostsFile = "hosts.toml"
	// BackupSuffix is appended to HostsFile to name the backup of a file that
	// shoal replaced.
	BackupSuffix = ".shoal-backup"
	// Marker starts the first line of every file shoal writes. A file that
	// does not start with it was not written by shoal.
	Marker = "# Written by shoal"
)

// DefaultRegistries are the registries configured when Config.Registries is
// empty.
var DefaultRegistries = []string{"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"}

// DefaultDialTimeout is the dial timeout to the mirror when Config.DialTimeout
// is zero. A short one makes containerd fall back to the next host quickly
// when the local node is down.
const DefaultDialTimeout = 200 * time.Millisecond

// Config says where and what to write.
type Config struct {
	// CertsDir is containerd's registry config_path, e.g. /etc/containerd/certs.d.
	CertsDir string
	// MirrorURL is the local shoal node, e.g. http://127.0.0.1:30020.
	MirrorURL string
	// Registries to configure. Empty means DefaultRegistries.
	Registries []string
	// DialTimeout for the mirror host (containerd's per-host dial_timeout).
	// Zero means DefaultDialTimeout; negative leaves the key out.
	DialTimeout time.Duration
	// ResolveTags gives the mirror the "resolve" capability, so containerd
	// asks it for tags as well as digests. DefaultConfig sets it; note that
	// the zero Config leaves it false (pull by digest only).
	ResolveTags bool
	// Logger receives one line per file written, backed up or restored.
	// Nil discards.
	Logger *slog.Logger
}

// DefaultConfig returns a Config with the default registries, dial timeout
// and ResolveTags set, for the given certs dir and mirror URL.
func DefaultConfig(certsDir, mirrorURL string) Config {
	return Config{
		CertsDir:    certsDir,
		MirrorURL:   mirrorURL,
		Registries:  append([]string(nil), DefaultRegistries...),
		DialTimeout: DefaultDialTimeout,
		ResolveTags: true,
	}
}

func (c Config) withDefaults() (Config, error) {
	if c.CertsDir == "" {
		return c, errors.New("mirror: CertsDir is empty")
	}
	if len(c.Registries) == 0 {
		c.Registries = DefaultRegistries
	}
	for _, r := range c.Registries {
		if r == "" || r == "." || r == ".." || strings.ContainsAny(r, `/\`) {
			return c, fmt.Errorf("mirror: invalid registry name %q", r)
		}
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Upstream returns the real registry URL containerd falls back to for a
// registry name: https://registry-1.docker.io for docker.io, else
// https://<registry>.
func Upstream(registry string) string {
	if registry == "docker.io" {
		return "https://registry-1.docker.io"
	}
	return "https://" + registry
}

// Configure writes <CertsDir>/<registry>/hosts.toml for every registry. A
// file that shoal did not write is first copied to hosts.toml.shoal-backup,
// and its server and hosts are kept in the new file. Running it again with
// the same Config writes the same bytes.
func Configure(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	u, err := url.Parse(cfg.MirrorURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("mirror: MirrorURL %q must be an http or https URL with a host", cfg.MirrorURL)
	}
	for _, reg := range cfg.Registries {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := configureOne(cfg, reg); err != nil {
			return fmt.Errorf("mirror: configure %s: %w", reg, err)
		}
	}
	return nil
}

func configureOne(cfg Config, reg string) error {
	dir := filepath.Join(cfg.CertsDir, reg)
	file := filepath.Join(dir, HostsFile)
	backup := file + BackupSuffix

	// Find the configuration that was there before shoal: the current file
	// if someone else wrote it, else the backup shoal made earlier.
	var prev []byte
	cur, err := os.ReadFile(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return err
	case !isShoal(cur):
		prev = cur
	}
	needBackup := prev != nil
	if prev == nil {
		b, err := os.ReadFile(backup)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return err
		default:
			prev = b
		}
	}

	var existing *hostsFile
	if prev != nil {
		existing, err = parseHostsFile(prev)
		if err != nil {
			return fmt.Errorf("parse existing %s: %w", file, err)
		}
	}
	out, err := render(cfg, reg, existing)
	if err != nil {
		return err
	}
	if cur != nil && string(cur) == string(out) {
		return nil
	}
	if needBackup {
		if err := writeAtomic(backup, cur); err != nil {
			return fmt.Errorf("back up %s: %w", file, err)
		}
		cfg.Logger.Info("backed up existing containerd hosts file", "file", file, "backup", backup)
	}
	if err := writeAtomic(file, out); err != nil {
		return err
	}
	cfg.Logger.Info("wrote containerd hosts file", "file", file, "mirror", cfg.MirrorURL)
	return nil
}

// Remove undoes Configure: for every registry it restores the backup if there
// is one, else deletes shoal's hosts.toml and then the directory if it is
// empty. A hosts.toml that shoal did not write is never deleted.
func Remove(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	for _, reg := range cfg.Registries {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := removeOne(cfg, reg); err != nil {
			return fmt.Errorf("mirror: remove %s: %w", reg, err)
		}
	}
	return nil
}

func removeOne(cfg Config, reg string) error {
	dir := filepath.Join(cfg.CertsDir, reg)
	file := filepath.Join(dir, HostsFile)
	backup := file + BackupSuffix

	cur, err := os.ReadFile(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		cur = nil
	case err != nil:
		return err
	case !isShoal(cur):
		// Someone else's file: leave it, and leave the backup too.
		cfg.Logger.Warn("not removing containerd hosts file that shoal did not write", "file", file)
		return nil
	}

	if _, err := os.Stat(backup); err == nil {
		if err := os.Rename(backup, file); err != nil {
			return err
		}
		cfg.Logger.Info("restored containerd hosts file", "file", file)
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if cur == nil {
		return nil
	}
	if err := os.Remove(file); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	cfg.Logger.Info("removed containerd hosts file", "file", file)
	// Remove the directory only if nothing else (certificates, say) is in it.
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) > 0 {
		return nil
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func isShoal(b []byte) bool { return strings.HasPrefix(string(b), Marker) }

// writeAtomic writes b to a temporary file in the same directory and renames
// it over path, so containerd never reads a half-written file.
func writeAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".shoal-*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
