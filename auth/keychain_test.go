package auth

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

const (
	hubUser = "hubuser"
	hubPass = "hub-s3cr3t-pass"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func registry(t *testing.T, host string) authn.Resource {
	t.Helper()
	r, err := name.NewRegistry(host)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func authOf(t *testing.T, k authn.Keychain, host string) authn.AuthConfig {
	t.Helper()
	a, err := k.Resolve(registry(t, host))
	if err != nil {
		t.Fatalf("Resolve(%s): %v", host, err)
	}
	c, err := a.Authorization()
	if err != nil {
		t.Fatalf("Authorization(%s): %v", host, err)
	}
	return *c
}

const configJSON = `{
  "auths": {
    "https://index.docker.io/v1/": {"auth": "` + "aHVidXNlcjpodWItczNjcjN0LXBhc3M=" + `"},
    "https://ghcr.io/v2/": {"username": "gh", "password": "gh-s3cr3t"},
    "quay.io": {"identitytoken": "quay-s3cr3t-token"},
    "registry.example:5000": {"auth": "` + "bG9jYWw6bG9jYWwtczNjcjN0" + `"}
  },
  "credsStore": "desktop"
}`

func TestFileKeychainMatchesHosts(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, p, configJSON)
	k, err := NewFileKeychain(p)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, host          string
		user, pass, idtoken string
		account             string
	}{
		{"docker_io_matches_index_v1_key", "docker.io", hubUser, hubPass, "", hubUser},
		{"index_docker_io_alias", "index.docker.io", hubUser, hubPass, "", hubUser},
		{"registry_1_docker_io_alias", "registry-1.docker.io", hubUser, hubPass, "", hubUser},
		{"key_with_scheme_and_path", "ghcr.io", "gh", "gh-s3cr3t", "", "gh"},
		{"identity_token_only", "quay.io", "", "", "quay-s3cr3t-token", AccountToken},
		{"host_with_port", "registry.example:5000", "local", "local-s3cr3t", "", "local"},
		{"unknown_host_is_anonymous", "registry.k8s.io", "", "", "", AccountAnonymous},
		{"port_must_match", "registry.example", "", "", "", AccountAnonymous},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := authOf(t, k, tt.host)
			if got.Username != tt.user || got.Password != tt.pass || got.IdentityToken != tt.idtoken {
				t.Errorf("credentials for %s: user=%q pass-ok=%v token-ok=%v", tt.host, got.Username, got.Password == tt.pass, got.IdentityToken == tt.idtoken)
			}
			if a := k.Account(tt.host); a != tt.account {
				t.Errorf("Account(%s) = %q, want %q", tt.host, a, tt.account)
			}
		})
	}
	a, _ := k.Resolve(registry(t, "registry.k8s.io"))
	if a != authn.Anonymous {
		t.Errorf("unmatched host resolved to %T, want authn.Anonymous", a)
	}
}

func TestNormalizeHost(t *testing.T) {
	for in, want := range map[string]string{
		"https://index.docker.io/v1/": "docker.io",
		"index.docker.io":             "docker.io",
		"registry-1.docker.io":        "docker.io",
		"Docker.IO":                   "docker.io",
		"http://ghcr.io/v2/foo":       "ghcr.io",
		"localhost:5000":              "localhost:5000",
		" quay.io ":                   "quay.io",
	} {
		if got := NormalizeHost(in); got != want {
			t.Errorf("NormalizeHost(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFileKeychainFormats(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the path to load
	}{
		{"docker_config_json", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "config.json")
			writeFile(t, p, `{"auths":{"docker.io":{"username":"hubuser","password":"`+hubPass+`"}}}`)
			return p
		}},
		{"secret_dir_with_dockerconfigjson_key", func(t *testing.T, dir string) string {
			writeFile(t, filepath.Join(dir, ".dockerconfigjson"), `{"auths":{"https://index.docker.io/v1/":{"auth":"`+b64(hubUser+":"+hubPass)+`"}}}`)
			return dir
		}},
		{"legacy_dockercfg_file", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, ".dockercfg")
			writeFile(t, p, `{"https://index.docker.io/v1/":{"auth":"`+b64(hubUser+":"+hubPass)+`","email":"x@example.com"}}`)
			return p
		}},
		{"secret_dir_with_legacy_dockercfg_key", func(t *testing.T, dir string) string {
			writeFile(t, filepath.Join(dir, ".dockercfg"), `{"index.docker.io":{"auth":"`+b64(hubUser+":"+hubPass)+`"}}`)
			return dir
		}},
		{"unpadded_base64_auth", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "config.json")
			writeFile(t, p, `{"auths":{"docker.io":{"auth":"`+strings.TrimRight(b64(hubUser+":"+hubPass), "=")+`"}}}`)
			return p
		}},
		{"exact_host_key_wins_over_alias", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "config.json")
			writeFile(t, p, `{"auths":{
				"https://index.docker.io/v1/":{"username":"old","password":"old"},
				"docker.io":{"username":"hubuser","password":"`+hubPass+`"}}}`)
			return p
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := NewFileKeychain(tt.setup(t, t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			got := authOf(t, k, "docker.io")
			if got.Username != hubUser || got.Password != hubPass {
				t.Fatalf("docker.io user = %q (password matches: %v)", got.Username, got.Password == hubPass)
			}
		})
	}
}

func TestNewFileKeychainErrorsNeverQuoteSecrets(t *testing.T) {
	tests := map[string]string{
		"not_json":           "user:" + hubPass,
		"auths_not_a_map":    `{"auths": "` + hubPass + `"}`,
		"auth_not_base64":    `{"auths":{"docker.io":{"auth":"!!` + hubPass + `"}}}`,
		"auth_without_colon": `{"auths":{"docker.io":{"auth":"` + b64(hubPass) + `"}}}`,
	}
	for name, content := range tests {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "config.json")
			writeFile(t, p, content)
			_, err := NewFileKeychain(p)
			if err == nil {
				t.Fatal("NewFileKeychain accepted a broken file")
			}
			if strings.Contains(err.Error(), hubPass) || strings.Contains(err.Error(), b64(hubPass)) {
				t.Fatalf("error quotes the secret: %v", err)
			}
		})
	}
	t.Run("missing_file", func(t *testing.T) {
		if _, err := NewFileKeychain(filepath.Join(t.TempDir(), "nope.json")); err == nil {
			t.Fatal("NewFileKeychain accepted a missing file")
		}
	})
	t.Run("dir_without_known_key", func(t *testing.T) {
		if _, err := NewFileKeychain(t.TempDir()); err == nil {
			t.Fatal("NewFileKeychain accepted an empty directory")
		}
	})
}

func userConfig(user string) string {
	return `{"auths":{"docker.io":{"username":"` + user + `","password":"p-` + user + `"}}}`
}

func TestFileKeychainReloadsChangedFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, p, userConfig("first"))
	k, err := NewFileKeychain(p, WithReloadInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	if a := k.Account("docker.io"); a != "first" {
		t.Fatalf("Account = %q, want first", a)
	}
	writeFile(t, p, userConfig("second-user"))
	if a := k.Account("docker.io"); a != "second-user" {
		t.Fatalf("after rewrite Account = %q, want second-user", a)
	}

	// A broken update keeps the last good credentials.
	writeFile(t, p, "{broken")
	if a := k.Account("docker.io"); a != "second-user" {
		t.Fatalf("after broken rewrite Account = %q, want second-user kept", a)
	}
	// A deleted file too.
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if a := k.Account("docker.io"); a != "second-user" {
		t.Fatalf("after delete Account = %q, want second-user kept", a)
	}
	writeFile(t, p, userConfig("third"))
	if a := k.Account("docker.io"); a != "third" {
		t.Fatalf("after restore Account = %q, want third", a)
	}
}

func TestFileKeychainChecksAtMostEveryInterval(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, p, userConfig("first"))
	k, err := NewFileKeychain(p, WithReloadInterval(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	k.now = func() time.Time { return now }
	k.lastCheck = now

	writeFile(t, p, userConfig("second-user"))
	if a := k.Account("docker.io"); a != "first" {
		t.Fatalf("within the interval Account = %q, want first (no re-stat)", a)
	}
	now = now.Add(time.Minute)
	if a := k.Account("docker.io"); a != "second-user" {
		t.Fatalf("after the interval Account = %q, want second-user", a)
	}
}

// TestFileKeychainFollowsSecretSymlinkSwap mimics how the kubelet updates a
// mounted Secret: the key is a symlink through ..data, and ..data is
// atomically re-pointed at a new timestamped directory.
func TestFileKeychainFollowsSecretSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "..2026_01", ".dockerconfigjson"), userConfig("first"))
	if err := os.Symlink("..2026_01", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/.dockerconfigjson", filepath.Join(dir, ".dockerconfigjson")); err != nil {
		t.Fatal(err)
	}
	k, err := NewFileKeychain(dir, WithReloadInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	if a := k.Account("index.docker.io"); a != "first" {
		t.Fatalf("Account = %q, want first", a)
	}

	// Same size and (possibly) same mtime: only the inode tells them apart.
	writeFile(t, filepath.Join(dir, "..2026_02", ".dockerconfigjson"), userConfig("other"))
	if err := os.Symlink("..2026_02", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "..2026_01")); err != nil {
		t.Fatal(err)
	}
	if a := k.Account("index.docker.io"); a != "other" {
		t.Fatalf("after the swap Account = %q, want other", a)
	}
}

func TestSecretsNeverPrinted(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, p, configJSON)
	k, err := NewFileKeychain(p)
	if err != nil {
		t.Fatal(err)
	}
	cred, err := k.Resolve(registry(t, "docker.io"))
	if err != nil {
		t.Fatal(err)
	}
	tok := NewToken("tok-s3cr3t-value")
	// A transport of its own: fmt walks unexported fields by reflection, and
	// walking http.DefaultTransport races with other tests' connections.
	rt := tok.RoundTripper(&http.Transport{})
	secrets := []string{hubPass, b64(hubUser + ":" + hubPass), "gh-s3cr3t", "quay-s3cr3t-token", "local-s3cr3t", "tok-s3cr3t-value"}

	// unexported fields: fmt cannot call String on them and falls back to
	// reflection, which must still not reach the secret.
	type holder struct {
		tok  Token
		cred authn.Authenticator
		rt   any
		kc   *FileKeychain
	}
	values := map[string]any{
		"keychain": k, "credential": cred, "token": tok, "roundtripper": rt,
		"holder": holder{tok, cred, rt, k}, "holder_ptr": &holder{tok, cred, rt, k},
	}

	var out bytes.Buffer
	for name, v := range values {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x"} {
			fmt.Fprintf(&out, name+" "+verb+"\n", v)
		}
	}
	logger := slog.New(slog.NewJSONHandler(&out, nil))
	logger.Info("values", "keychain", k, "credential", cred, "token", tok, "roundtripper", rt)
	logger.Info("nested", "config", struct {
		Token Token
		Keys  *FileKeychain
	}{tok, k})
	logger.Info("group", slog.Group("g", slog.Any("token", tok), slog.Any("cred", cred)))

	s := out.String()
	for _, secret := range secrets {
		if strings.Contains(s, secret) || strings.Contains(s, fmt.Sprintf("%x", secret)) {
			t.Errorf("secret %q found in output:\n%s", secret, s)
		}
	}
	if !strings.Contains(s, Redacted) {
		t.Fatalf("output does not say %s:\n%s", Redacted, s)
	}
}
