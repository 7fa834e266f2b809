package upstream_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
)

const reg = "hub.test"

type env struct {
	hub    *hub
	client *upstream.Client
	budget *budget.Budget
	prom   *prometheus.Registry
}

// newEnv starts a hub and a client for it, authenticated unless creds is nil.
func newEnv(t *testing.T, creds *authn.AuthConfig, opts ...upstream.Option) *env {
	t.Helper()
	h := startHub(t)
	e := &env{hub: h, budget: budget.New(budget.NewMemoryState(), budget.WithReserve(5)), prom: prometheus.NewPedanticRegistry()}
	kc := keychain{}
	if creds != nil {
		kc[reg] = *creds
	}
	cfg := upstream.Config{Registries: map[string]upstream.Registry{reg: {Host: reg, Endpoint: h.URL}}}
	opts = append([]upstream.Option{upstream.WithKeychain(kc), upstream.WithObserver(e.budget), upstream.WithRegisterer(e.prom),
		upstream.WithTimeouts(time.Second, 2*time.Second)}, opts...)
	c, err := upstream.New(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	e.client = c
	return e
}

var alice = &authn.AuthConfig{Username: hubUser, Password: hubPass}

func digestOf(t *testing.T, img v1.Image) (digest.Digest, int64, string) {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(d.String()), int64(len(raw)), string(mt)
}

func budgetStatus(t *testing.T, b *budget.Budget, account string) budget.Status {
	t.Helper()
	sts, err := b.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if s.Upstream == reg && s.Account == account {
			return s
		}
	}
	t.Fatalf("no budget for %s/%s in %+v", reg, account, sts)
	return budget.Status{}
}

func TestTokenIsFetchedOnceAndReused(t *testing.T) {
	e := newEnv(t, alice)
	img := e.hub.seed(t, "team/app", "v1")
	dgst, _, _ := digestOf(t, img)
	ctx := context.Background()
	const n = 5
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if _, err := e.client.HeadManifest(ctx, reg, "team/app", "v1"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if _, _, err := e.client.GetManifest(ctx, reg, "team/app", dgst.String()); err != nil {
		t.Fatal(err)
	}
	if got := e.hub.tokens.Load(); got != 1 {
		t.Fatalf("token server issued %d tokens for %d requests, want 1", got, n+1)
	}
	// Another repository needs its own scope, hence its own token.
	e.hub.seed(t, "team/other", "v1")
	if _, err := e.client.HeadManifest(ctx, reg, "team/other", "v1"); err != nil {
		t.Fatal(err)
	}
	if got := e.hub.tokens.Load(); got != 2 {
		t.Fatalf("tokens = %d after a second repository, want 2", got)
	}
	if got := e.client.Account(reg); got != hubUser {
		t.Fatalf("Account = %q, want %q", got, hubUser)
	}
	if got := testutil.ToFloat64(mustCounter(t, e.prom, "token")); got != 2 {
		t.Fatalf("token requests metric = %v, want 2", got)
	}
}

// mustCounter sums shoal_upstream_requests_total for one kind.
func mustCounter(t *testing.T, g prometheus.Gatherer, kind string) prometheus.Collector {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != "shoal_upstream_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == kind {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "sum"})
	c.Add(sum)
	return c
}

func TestWithoutCredentialsIsUnauthorized(t *testing.T) {
	e := newEnv(t, nil)
	e.hub.seed(t, "team/app", "v1")
	_, err := e.client.HeadManifest(context.Background(), reg, "team/app", "v1")
	var ue *upstream.Error
	if !errors.As(err, &ue) || ue.Status != http.StatusUnauthorized || ue.Code != "UNAUTHORIZED" {
		t.Fatalf("HeadManifest without credentials = %v, want 401 UNAUTHORIZED", err)
	}
	if got := e.client.Account(reg); got != "anonymous" {
		t.Fatalf("Account = %q, want anonymous", got)
	}
}

func TestPasswordNeverInErrors(t *testing.T) {
	secret := "s3cret-Pa55word"
	basic := base64.StdEncoding.EncodeToString([]byte(hubUser + ":" + secret))
	wrong := newEnv(t, &authn.AuthConfig{Username: hubUser, Password: secret})
	_, _, err1 := wrong.client.GetManifest(context.Background(), reg, "team/app", "v1")

	right := newEnv(t, &authn.AuthConfig{Username: hubUser, Password: hubPass})
	_, _, err2 := right.client.GetManifest(context.Background(), reg, "team/app", "missing")
	_, _, err3 := right.client.GetBlob(context.Background(), reg, "team/app", digest.FromString("nope"), 0)
	for i, err := range []error{err1, err2, err3} {
		if err == nil {
			t.Fatalf("error %d is nil", i)
		}
		for _, s := range []string{secret, hubPass, basic, "Bearer", "Basic "} {
			if strings.Contains(err.Error(), s) {
				t.Fatalf("error %d %q contains %q", i, err, s)
			}
		}
	}
}

func TestHeadDoesNotCountGetDoes(t *testing.T) {
	e := newEnv(t, alice)
	img := e.hub.seed(t, "team/app", "v1")
	want, size, mt := digestOf(t, img)
	ctx := context.Background()

	d, err := e.client.HeadManifest(ctx, reg, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if d.Digest != want || d.Size != size || d.MediaType != mt {
		t.Fatalf("HeadManifest = %+v, want %s %d %s", d, want, size, mt)
	}
	s := budgetStatus(t, e.budget, hubUser)
	if s.Spent != 0 || s.Limit != 100 || s.Remaining != 100 || s.Window != 6*time.Hour {
		t.Fatalf("budget after HEAD = %+v, want nothing spent, 100/100 per 6h", s)
	}
	if e.hub.manifestGets.Load() != 0 {
		t.Fatal("HEAD reached the upstream as a GET")
	}

	b, d2, err := e.client.GetManifest(ctx, reg, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if d2 != d || digest.FromBytes(b) != want {
		t.Fatalf("GetManifest = %+v, want %+v", d2, d)
	}
	s = budgetStatus(t, e.budget, hubUser)
	if s.Spent != 1 || s.Remaining != 99 || e.hub.manifestGets.Load() != 1 {
		t.Fatalf("budget after GET = %+v (upstream saw %d GETs), want 1 spent, 99 remaining", s, e.hub.manifestGets.Load())
	}
}

func TestGetManifestByDigestVerifies(t *testing.T) {
	e := newEnv(t, alice)
	img := e.hub.seed(t, "team/app", "v1")
	want, _, _ := digestOf(t, img)
	b, d, err := e.client.GetManifest(context.Background(), reg, "team/app", want.String())
	if err != nil || d.Digest != want || digest.FromBytes(b) != want {
		t.Fatalf("GetManifest by digest = %+v, %v", d, err)
	}
}

func TestDockerHubNamesAreMapped(t *testing.T) {
	h := startHub(t)
	img := h.seed(t, "library/alpine", "3.20")
	want, _, _ := digestOf(t, img)
	c, err := upstream.New(upstream.Config{Registries: map[string]upstream.Registry{
		"docker.io": {Host: "docker.io", Endpoint: h.URL},
	}}, upstream.WithKeychain(keychain{"index.docker.io": *alice}))
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.HeadManifest(context.Background(), "docker.io", "alpine", "3.20")
	if err != nil || d.Digest != want {
		t.Fatalf("HeadManifest(docker.io, alpine) = %+v, %v; want %s", d, err, want)
	}
}

func TestNormalizeRepo(t *testing.T) {
	tests := []struct{ registry, repo, want string }{
		{"docker.io", "alpine", "library/alpine"},
		{"docker.io", "bitnami/redis", "bitnami/redis"},
		{"index.docker.io", "nginx", "library/nginx"},
		{"ghcr.io", "app", "app"},
		{"quay.io", "org/app", "org/app"},
	}
	for _, tt := range tests {
		if got := upstream.NormalizeRepo(tt.registry, tt.repo); got != tt.want {
			t.Errorf("NormalizeRepo(%q, %q) = %q, want %q", tt.registry, tt.repo, got, tt.want)
		}
	}
}

func layer(t *testing.T, img v1.Image) (digest.Digest, []byte) {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	d, err := ls[0].Digest()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := ls[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(d.String()), b
}

func TestGetBlobRange(t *testing.T) {
	e := newEnv(t, alice)
	dgst, want := layer(t, e.hub.seed(t, "team/app", "v1"))
	for _, off := range []int64{0, 1, int64(len(want)) / 2, int64(len(want)) - 1} {
		rc, total, err := e.client.GetBlob(context.Background(), reg, "team/app", dgst, off)
		if err != nil {
			t.Fatalf("offset %d: %v", off, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || total != int64(len(want)) || !bytes.Equal(got, want[off:]) {
			t.Fatalf("offset %d: got %d bytes (total %d), %v; want %d of %d", off, len(got), total, err, len(want)-int(off), len(want))
		}
	}
	sts, err := e.budget.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if s.Spent != 0 {
			t.Fatalf("blob GETs spent %d of the budget, want 0", s.Spent)
		}
	}
}

func TestBlobRedirectDropsAuthorization(t *testing.T) {
	e := newEnv(t, alice)
	dgst, want := layer(t, e.hub.seed(t, "team/app", "v1"))
	var mu sync.Mutex
	var sawAuth []string
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		sawAuth = append(sawAuth, r.Header.Get("Authorization"))
		mu.Unlock()
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(want))
	}))
	t.Cleanup(storage.Close)
	e.hub.blobRedirect.Store(storage.URL)

	rc, total, err := e.client.GetBlob(context.Background(), reg, "team/app", dgst, 10)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if total != int64(len(want)) || !bytes.Equal(got, want[10:]) {
		t.Fatalf("redirected GetBlob: %d bytes of total %d", len(got), total)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(sawAuth) != 1 || sawAuth[0] != "" {
		t.Fatalf("blob storage saw Authorization %q, want one request without it", sawAuth)
	}
}

func TestNotFound(t *testing.T) {
	e := newEnv(t, alice)
	e.hub.seed(t, "team/app", "v1")
	ctx := context.Background()
	_, err1 := e.client.HeadManifest(ctx, reg, "team/app", "nope")
	_, _, err2 := e.client.GetManifest(ctx, reg, "team/app", "nope")
	_, _, err3 := e.client.GetBlob(ctx, reg, "team/app", digest.FromString("absent"), 0)
	for i, err := range []error{err1, err2, err3} {
		if !upstream.IsNotFound(err) || upstream.IsUnavailable(err) || upstream.IsRateLimited(err) {
			t.Fatalf("error %d = %v, want only IsNotFound", i, err)
		}
	}
	var ue *upstream.Error
	if !errors.As(err2, &ue) || ue.Code != "MANIFEST_UNKNOWN" {
		t.Fatalf("GetManifest error = %v, want MANIFEST_UNKNOWN", err2)
	}
}

func TestRateLimited(t *testing.T) {
	e := newEnv(t, alice)
	e.hub.seed(t, "team/app", "v1")
	ctx := context.Background()
	if _, err := e.client.HeadManifest(ctx, reg, "team/app", "v1"); err != nil {
		t.Fatal(err)
	}
	e.hub.throttle.Store(true)
	_, _, err := e.client.GetManifest(ctx, reg, "team/app", "v1")
	var ue *upstream.Error
	if !upstream.IsRateLimited(err) || !errors.As(err, &ue) || ue.RetryAfter != 42*time.Second {
		t.Fatalf("GetManifest when throttled = %v, want rate limited, retry after 42s", err)
	}
	var ee *budget.ExhaustedError
	if err := e.budget.Allow(ctx, reg, hubUser, true); !errors.As(err, &ee) || ee.Reason != "throttled" {
		t.Fatalf("budget.Allow after 429 = %v, want throttled", err)
	}
}

func TestUnavailable(t *testing.T) {
	t.Run("server_down", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		url := srv.URL
		srv.Close()
		c, err := upstream.New(upstream.Config{Registries: map[string]upstream.Registry{reg: {Endpoint: url}}},
			upstream.WithTimeouts(time.Second, time.Second))
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.HeadManifest(context.Background(), reg, "team/app", "v1")
		if !upstream.IsUnavailable(err) || upstream.IsNotFound(err) {
			t.Fatalf("HeadManifest against a closed port = %v, want IsUnavailable", err)
		}
	})
	t.Run("5xx", func(t *testing.T) {
		e := newEnv(t, alice)
		e.hub.seed(t, "team/app", "v1")
		if _, err := e.client.HeadManifest(context.Background(), reg, "team/app", "v1"); err != nil {
			t.Fatal(err)
		}
		e.hub.unavailable.Store(true)
		_, _, err := e.client.GetManifest(context.Background(), reg, "team/app", "v1")
		if !upstream.IsUnavailable(err) {
			t.Fatalf("GetManifest on 503 = %v, want IsUnavailable", err)
		}
	})
	t.Run("response_header_timeout", func(t *testing.T) {
		release := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			<-release
		}))
		t.Cleanup(srv.Close)
		t.Cleanup(func() { close(release) })
		c, err := upstream.New(upstream.Config{Registries: map[string]upstream.Registry{reg: {Endpoint: srv.URL}}},
			upstream.WithTimeouts(time.Second, 200*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = c.HeadManifest(context.Background(), reg, "team/app", "v1")
		if !upstream.IsUnavailable(err) || time.Since(start) > 3*time.Second {
			t.Fatalf("HeadManifest against a silent server = %v after %v, want IsUnavailable quickly", err, time.Since(start))
		}
	})
}
