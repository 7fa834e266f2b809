package upstream_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

const (
	hubUser = "alice"
	hubPass = "correct-horse-battery-staple"
)

// hub is a Docker-Hub-like upstream for tests: a real distribution registry
// with in-memory storage, behind a token server that wants basic auth and
// answers manifest GET/HEAD with ratelimit headers.
type hub struct {
	URL  string // authenticated endpoint (http://127.0.0.1:P)
	push string // host:port of an unauthenticated endpoint, for seeding

	tokens       atomic.Int32 // tokens issued
	manifestGets atomic.Int32
	remaining    atomic.Int32
	throttle     atomic.Bool  // answer manifests with 429
	unavailable  atomic.Bool  // answer everything with 503
	blobRedirect atomic.Value // string: base URL to redirect blob GETs to

	mu    sync.Mutex
	valid map[string]bool
}

func startHub(t *testing.T) *hub {
	t.Helper()
	cfg := &configuration.Configuration{Storage: configuration.Storage{
		"inmemory": configuration.Parameters{},
		"maintenance": configuration.Parameters{
			"uploadpurging": map[any]any{"enabled": false},
		},
	}}
	app := handlers.NewApp(context.Background(), cfg)
	t.Cleanup(func() { _ = app.Shutdown() })

	h := &hub{valid: map[string]bool{}}
	h.remaining.Store(100)
	h.blobRedirect.Store("")
	pushSrv := httptest.NewServer(app)
	t.Cleanup(pushSrv.Close)
	h.push = strings.TrimPrefix(pushSrv.URL, "http://")

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.serve(w, r, app)
	}))
	t.Cleanup(srv.Close)
	h.URL = srv.URL
	return h
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request, app http.Handler) {
	if h.unavailable.Load() {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	if r.URL.Path == "/token" {
		user, pass, ok := r.BasicAuth()
		if !ok || user != hubUser || pass != hubPass {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"incorrect username or password"}]}`)
			return
		}
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		tok := hex.EncodeToString(b)
		h.mu.Lock()
		h.valid[tok] = true
		h.mu.Unlock()
		h.tokens.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]any{"token": tok, "expires_in": 300})
		return
	}
	tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	h.mu.Lock()
	ok := h.valid[tok]
	h.mu.Unlock()
	if !ok {
		ch := fmt.Sprintf(`Bearer realm="http://%s/token",service="hub.test"`, r.Host)
		if parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/", 2); len(parts) == 2 {
			ch += fmt.Sprintf(`,scope="repository:%s:pull"`, parts[0])
		}
		w.Header().Set("WWW-Authenticate", ch)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
		return
	}
	if strings.Contains(r.URL.Path, "/manifests/") {
		if r.Method == http.MethodGet {
			h.manifestGets.Add(1)
			h.remaining.Add(-1)
		}
		w.Header().Set("ratelimit-limit", "100;w=21600")
		w.Header().Set("ratelimit-remaining", strconv.Itoa(int(h.remaining.Load()))+";w=21600")
		if h.throttle.Load() {
			w.Header().Set("Retry-After", "42")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			fmt.Fprint(w, `{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}`)
			return
		}
	}
	if to := h.blobRedirect.Load().(string); to != "" && strings.Contains(r.URL.Path, "/blobs/") {
		http.Redirect(w, r, to+r.URL.Path, http.StatusTemporaryRedirect)
		return
	}
	app.ServeHTTP(w, r)
}

// seed pushes a random image to repo:tag and returns it.
func (h *hub) seed(t *testing.T, repo, tag string) v1.Image {
	t.Helper()
	img, err := random.Image(1024, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(h.push+"/"+repo+":"+tag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return img
}

// keychain hands out fixed credentials per registry host.
type keychain map[string]authn.AuthConfig

func (k keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}
