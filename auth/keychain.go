// Package auth holds shoal's credentials and secrets: upstream registry
// credentials from a docker config.json or a Kubernetes dockerconfigjson
// Secret, the bearer token that node tiers present to the cache tier, and the
// libp2p pre-shared key.
//
// Nothing here logs a secret. Every type that holds one prints and logs as
// "[redacted]" (String, GoString and slog's LogValue), and error messages
// never quote file contents.
package auth

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
)

// Redacted is what every secret-holding type prints and logs as.
const Redacted = "[redacted]"

// AccountAnonymous is the account label for a registry with no credentials.
const AccountAnonymous = "anonymous"

// AccountToken is the account label for credentials that carry a token but no
// username.
const AccountToken = "token"

// DefaultReloadInterval is how often, at most, a FileKeychain stats its file
// to see whether it changed.
const DefaultReloadInterval = 5 * time.Second

// File names inside a Kubernetes Secret mounted as a directory, in the order
// they are tried, then config.json as in a ~/.docker directory.
var secretKeys = []string{".dockerconfigjson", ".dockercfg", "config.json"}

// FileKeychain is an authn.Keychain backed by a docker config.json, a
// kubernetes.io/dockerconfigjson Secret (a file, or a directory holding the
// .dockerconfigjson key), or a legacy .dockercfg file. Credentials are
// matched by registry host; the Docker Hub aliases (docker.io,
// index.docker.io, registry-1.docker.io, https://index.docker.io/v1/) all
// match each other. The file is re-read when it changes, which covers the
// symlink swap Kubernetes does when it updates a mounted Secret.
//
// It is safe for concurrent use.
type FileKeychain struct {
	path     string
	interval time.Duration
	log      *slog.Logger
	now      func() time.Time

	mu        sync.Mutex
	lastCheck time.Time
	stamp     os.FileInfo
	file      string
	byHost    map[string]credential
}

// Option configures a FileKeychain.
type Option func(*FileKeychain)

// WithLogger sets the logger for reloads and reload failures. The default
// discards.
func WithLogger(l *slog.Logger) Option {
	return func(k *FileKeychain) {
		if l != nil {
			k.log = l
		}
	}
}

// WithReloadInterval sets how often, at most, the file is checked for
// changes. Zero checks on every use; a negative interval never reloads.
func WithReloadInterval(d time.Duration) Option {
	return func(k *FileKeychain) { k.interval = d }
}

// NewFileKeychain loads the credentials at path: a config.json or .dockercfg
// file, or a directory holding .dockerconfigjson, .dockercfg or config.json.
// It fails if the file cannot be read or parsed.
func NewFileKeychain(path string, opts ...Option) (*FileKeychain, error) {
	k := &FileKeychain{
		path:     path,
		interval: DefaultReloadInterval,
		log:      slog.New(slog.DiscardHandler),
		now:      time.Now,
	}
	for _, o := range opts {
		o(k)
	}
	file, fi, err := k.locate()
	if err != nil {
		return nil, err
	}
	creds, err := loadCredentials(file)
	if err != nil {
		return nil, err
	}
	k.file, k.stamp, k.byHost, k.lastCheck = file, fi, creds, k.now()
	return k, nil
}

// locate finds the credentials file under k.path and stats it, following
// symlinks.
func (k *FileKeychain) locate() (string, os.FileInfo, error) {
	fi, err := os.Stat(k.path)
	if err != nil {
		return "", nil, fmt.Errorf("auth: credentials: %w", err)
	}
	if !fi.IsDir() {
		return k.path, fi, nil
	}
	for _, name := range secretKeys {
		p := filepath.Join(k.path, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, fi, nil
		}
	}
	return "", nil, fmt.Errorf("auth: credentials: directory %s holds none of %s", k.path, strings.Join(secretKeys, ", "))
}

// refresh re-reads the file if the check interval passed and the file
// changed. A file that has become unreadable or invalid keeps the last good
// credentials in use.
func (k *FileKeychain) refresh() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.interval < 0 {
		return
	}
	now := k.now()
	if k.interval > 0 && now.Sub(k.lastCheck) < k.interval {
		return
	}
	k.lastCheck = now
	file, fi, err := k.locate()
	if err != nil {
		k.log.Warn("credentials file unavailable; keeping the last credentials", "path", k.path, "err", err)
		return
	}
	if file == k.file && sameFile(k.stamp, fi) {
		return
	}
	creds, err := loadCredentials(file)
	if err != nil {
		k.log.Warn("credentials file invalid; keeping the last credentials", "path", file, "err", err)
		return
	}
	k.file, k.stamp, k.byHost = file, fi, creds
	k.log.Info("reloaded registry credentials", "path", file, "registries", len(creds))
}

// sameFile reports whether a and b describe the same, unchanged file: the
// same inode (a Kubernetes Secret update swaps it), size and mtime.
func sameFile(a, b os.FileInfo) bool {
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}

func (k *FileKeychain) creds(host string) (credential, bool) {
	k.refresh()
	k.mu.Lock()
	defer k.mu.Unlock()
	c, ok := k.byHost[NormalizeHost(host)]
	return c, ok
}

func (k *FileKeychain) lookup(host string) (authn.AuthConfig, bool) {
	c, ok := k.creds(host)
	if !ok {
		return authn.AuthConfig{}, false
	}
	return c.get(), true
}

// Resolve implements authn.Keychain. It returns authn.Anonymous when no
// credentials match the resource's registry host.
func (k *FileKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	c, ok := k.creds(r.RegistryStr())
	if !ok {
		return authn.Anonymous, nil
	}
	return c, nil
}

// Lookup returns the credentials for a registry host, if there are any.
func (k *FileKeychain) Lookup(host string) (authn.AuthConfig, bool) {
	return k.lookup(host)
}

// Account returns a label for the account used with host, safe for metrics
// and logs: the username, AccountToken for a token without a username, or
// AccountAnonymous.
func (k *FileKeychain) Account(host string) string {
	c, ok := k.lookup(host)
	switch {
	case !ok:
		return AccountAnonymous
	case c.Username != "":
		return c.Username
	case c.IdentityToken != "" || c.RegistryToken != "":
		return AccountToken
	default:
		return AccountAnonymous
	}
}

// String implements fmt.Stringer without revealing credentials.
func (k *FileKeychain) String() string { return Redacted }

// GoString implements fmt.GoStringer without revealing credentials.
func (k *FileKeychain) GoString() string { return Redacted }

// LogValue implements slog.LogValuer without revealing credentials.
func (k *FileKeychain) LogValue() slog.Value { return slog.StringValue(Redacted) }

// credential is the authn.Authenticator for one registry. It prints and logs
// as "[redacted]". The secret sits in a closure: where fmt cannot call
// String (an unexported struct field) it falls back to reflection, and a
// func prints as an address.
type credential struct{ get func() authn.AuthConfig }

func newCredential(c authn.AuthConfig) credential {
	return credential{get: func() authn.AuthConfig { return c }}
}

// Authorization implements authn.Authenticator. It returns a copy.
func (c credential) Authorization() (*authn.AuthConfig, error) {
	cfg := c.get()
	return &cfg, nil
}

func (c credential) String() string               { return Redacted }
func (c credential) GoString() string             { return Redacted }
func (c credential) LogValue() slog.Value         { return slog.StringValue(Redacted) }
func (c credential) MarshalJSON() ([]byte, error) { return json.Marshal(Redacted) }

// NormalizeHost reduces a config.json key or a registry name to the host it
// names: the scheme and any path are dropped, it is lower-cased, and the
// Docker Hub aliases become "docker.io".
func NormalizeHost(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	if i := strings.IndexByte(s, '/'); i >= 0 {
		s = s[:i]
	}
	switch s {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return "docker.io"
	}
	return s
}

// authEntry is one registry's entry in a docker config file.
type authEntry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

func loadCredentials(file string) (map[string]credential, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("auth: credentials: %w", err)
	}
	creds, err := parseDockerConfig(b)
	if err != nil {
		return nil, fmt.Errorf("auth: credentials %s: %w", file, err)
	}
	return creds, nil
}

// parseDockerConfig reads a config.json ({"auths": {...}}) or a legacy
// .dockercfg (the auths map at the top level). Errors never quote the input.
func parseDockerConfig(b []byte) (map[string]credential, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, errors.New("not a JSON object")
	}
	var entries map[string]authEntry
	if raw, ok := top["auths"]; ok {
		if err := json.Unmarshal(raw, &entries); err != nil {
			return nil, errors.New(`"auths" is not a map of registry entries`)
		}
	} else {
		// Legacy .dockercfg: registry keys at the top level.
		entries = make(map[string]authEntry, len(top))
		// Non-object values (a config.json's "credsStore", "psFormat" and
		// such) are not registries.
		for key, raw := range top {
			if t := strings.TrimSpace(string(raw)); !strings.HasPrefix(t, "{") || key == "credHelpers" || key == "HttpHeaders" || key == "proxies" {
				continue
			}
			var e authEntry
			if err := json.Unmarshal(raw, &e); err != nil {
				return nil, fmt.Errorf("entry %q is not a registry entry", key)
			}
			entries[key] = e
		}
	}

	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	// Deterministic precedence when several keys name the same host: a key
	// that is exactly the host wins, else the first in sorted order.
	slices.Sort(keys)
	creds := make(map[string]credential, len(entries))
	exact := map[string]bool{}
	for _, key := range keys {
		host := NormalizeHost(key)
		if host == "" {
			continue
		}
		isExact := strings.EqualFold(strings.TrimSpace(key), host)
		if _, dup := creds[host]; dup && (exact[host] || !isExact) {
			continue
		}
		c, err := entries[key].config()
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", key, err)
		}
		creds[host] = newCredential(c)
		exact[host] = isExact
	}
	return creds, nil
}

func (e authEntry) config() (authn.AuthConfig, error) {
	c := authn.AuthConfig{
		Username:      e.Username,
		Password:      e.Password,
		IdentityToken: e.IdentityToken,
		RegistryToken: e.RegistryToken,
	}
	if e.Auth != "" {
		dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(e.Auth))
		if err != nil {
			// Some tools write unpadded base64.
			dec, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(strings.TrimSpace(e.Auth), "="))
		}
		if err != nil {
			return authn.AuthConfig{}, errors.New(`"auth" is not valid base64`)
		}
		user, pass, ok := strings.Cut(string(dec), ":")
		if !ok {
			return authn.AuthConfig{}, errors.New(`"auth" does not decode to user:password`)
		}
		c.Username, c.Password = user, pass
	}
	return c, nil
}
