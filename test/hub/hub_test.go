package hub

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

const repo = "library/alpine"

// token fetches a pull token for repo, anonymously when user is "".
func fetchToken(t *testing.T, h *Hub, user, pass, repo string) (string, *http.Response) {
	t.Helper()
	q := url.Values{"service": {Service}, "scope": {"repository:" + repo + ":pull"}}
	req, _ := http.NewRequest(http.MethodGet, h.URL()+"/token?"+q.Encode(), nil)
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("token: %v", err)
	}
	defer resp.Body.Close()
	var tr tokenResponse
	_ = json.NewDecoder(resp.Body).Decode(&tr)
	return tr.Token, resp
}

// do sends one request with a bearer token and returns the response with
// its body read.
func do(t *testing.T, method, u, tok string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, u, nil)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func ref(t *testing.T, h *Hub, repo, tag string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(h.Ref(repo, tag), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestAnonymousPullCountsOneManifestGET(t *testing.T) {
	h := Start(t)
	want := h.Push(t, repo, "3.20", Image(t, 1024, 2))
	if c := h.Counts(); c != (Counts{}) {
		t.Fatalf("push was counted: %+v", c)
	}

	img, err := remote.Image(ref(t, h, repo, "3.20"))
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatalf("read layer: %v", err)
		}
		rc.Close()
	}
	got, _ := img.Digest()
	if got.String() != want.String() {
		t.Fatalf("digest = %s, want %s", got, want)
	}
	c := h.Counts()
	if c.ManifestGET != 1 || c.TokenRequests < 1 || c.BlobGET < 2 {
		t.Fatalf("counts = %+v, want 1 manifest GET, >=1 token, >=2 blob GETs", c)
	}
	if h.Pulls("127.0.0.1") != 1 || h.ManifestGETs(repo, "3.20") != 1 {
		t.Fatalf("pulls = %d, manifest GETs for tag = %d", h.Pulls("127.0.0.1"), h.ManifestGETs(repo, "3.20"))
	}
	l0, _ := layers[0].Digest()
	if n := h.BlobGETs(DigestOf(l0)); n != 1 {
		t.Fatalf("BlobGETs(layer0) = %d, want 1", n)
	}
}

func TestIndexPullCountsEachManifest(t *testing.T) {
	h := Start(t)
	want := h.PushIndex(t, repo, "multi", Index(t, 512, "linux/amd64", "linux/arm64/v8"))
	idx, err := remote.Index(ref(t, h, repo, "multi"))
	if err != nil {
		t.Fatalf("pull index: %v", err)
	}
	im, _ := idx.IndexManifest()
	if len(im.Manifests) != 2 || im.Manifests[1].Platform.Variant != "v8" {
		t.Fatalf("index = %+v", im.Manifests)
	}
	if _, err := idx.Image(im.Manifests[0].Digest); err != nil {
		t.Fatalf("child: %v", err)
	}
	d, _ := idx.Digest()
	if d.String() != want.String() {
		t.Fatalf("digest = %s, want %s", d, want)
	}
	if c := h.Counts(); c.ManifestGET != 2 {
		t.Fatalf("manifest GETs = %d, want 2 (index + one child)", c.ManifestGET)
	}
}

func TestRateLimitHeaders(t *testing.T) {
	h := Start(t, WithAnonymousLimit(3), WithWindow(time.Hour), WithAccount("alice", "pw", 5), WithAccount("paid", "pw", Unlimited))
	h.Push(t, repo, "3.20", Image(t, 64, 1))
	murl := h.URL() + "/v2/" + repo + "/manifests/3.20"

	tests := []struct {
		name                          string
		user                          string
		method                        string
		wantStatus                    int
		wantLimit, wantRemain, source string
	}{
		{"anonymous HEAD does not count", "", http.MethodHead, 200, "3;w=3600", "3;w=3600", "127.0.0.1"},
		{"anonymous GET counts", "", http.MethodGet, 200, "3;w=3600", "2;w=3600", "127.0.0.1"},
		{"account has its own bucket", "alice", http.MethodGet, 200, "5;w=3600", "4;w=3600", "alice"},
		{"unlimited account has no headers", "paid", http.MethodGet, 200, "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, _ := fetchToken(t, h, tt.user, "pw", repo)
			resp, _ := do(t, tt.method, murl, tok)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status = %d", resp.StatusCode)
			}
			for k, want := range map[string]string{"ratelimit-limit": tt.wantLimit, "ratelimit-remaining": tt.wantRemain, "docker-ratelimit-source": tt.source} {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
		})
	}
	if c := h.Counts(); c.ManifestGET != 3 || c.ManifestHEAD != 1 {
		t.Fatalf("counts = %+v", c)
	}
	if h.Pulls("paid") != 1 || h.Pulls("alice") != 1 || !h.SawBasicAuth("alice") || h.SawBasicAuth("bob") {
		t.Fatal("per-account pulls or basic-auth record wrong")
	}
}

func TestExhaustedLimitAnswers429AndHEADStillWorks(t *testing.T) {
	h := Start(t, WithAnonymousLimit(2))
	h.Push(t, repo, "3.20", Image(t, 64, 1))
	murl := h.URL() + "/v2/" + repo + "/manifests/3.20"
	tok, _ := fetchToken(t, h, "", "", repo)
	for i := 0; i < 2; i++ {
		if resp, _ := do(t, http.MethodGet, murl, tok); resp.StatusCode != 200 {
			t.Fatalf("GET %d = %d", i, resp.StatusCode)
		}
	}
	resp, body := do(t, http.MethodGet, murl, tok)
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(body, `"code":"TOOMANYREQUESTS"`) ||
		!strings.Contains(body, "pull rate limit") {
		t.Fatalf("exhausted GET = %d %s", resp.StatusCode, body)
	}
	if got := resp.Header.Get("ratelimit-remaining"); got != "0;w=21600" {
		t.Fatalf("remaining = %q", got)
	}
	resp, _ = do(t, http.MethodHead, murl, tok)
	if resp.StatusCode != 200 || resp.Header.Get("ratelimit-remaining") != "0;w=21600" || resp.Header.Get("Docker-Content-Digest") == "" {
		t.Fatalf("HEAD after exhaustion = %d %v", resp.StatusCode, resp.Header)
	}
	if _, err := remote.Image(ref(t, h, repo, "3.20"), remote.WithRetryStatusCodes()); err == nil {
		t.Fatal("ggcr pull succeeded past the limit")
	} else {
		var te *transport.Error
		if !errors.As(err, &te) || te.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("ggcr error = %v", err)
		}
	}
	if c := h.Counts(); c.ManifestGET != 2 || c.Throttled != 2 {
		t.Fatalf("counts = %+v", c)
	}

	h.ResetLimits()
	if resp, _ := do(t, http.MethodGet, murl, tok); resp.StatusCode != 200 {
		t.Fatalf("GET after ResetLimits = %d", resp.StatusCode)
	}
}

func TestWindowRefills(t *testing.T) {
	h := Start(t, WithAnonymousLimit(1), WithWindow(200*time.Millisecond))
	h.Push(t, repo, "3.20", Image(t, 64, 1))
	murl := h.URL() + "/v2/" + repo + "/manifests/3.20"
	tok, _ := fetchToken(t, h, "", "", repo)
	statuses := []int{}
	for _, pause := range []time.Duration{0, 0, 250 * time.Millisecond} {
		time.Sleep(pause)
		resp, _ := do(t, http.MethodGet, murl, tok)
		statuses = append(statuses, resp.StatusCode)
	}
	if statuses[0] != 200 || statuses[1] != 429 || statuses[2] != 200 {
		t.Fatalf("statuses = %v, want [200 429 200]", statuses)
	}
}

func TestAuth(t *testing.T) {
	h := Start(t, WithAccount("alice", "pw", 10), WithTokenTTL(300*time.Millisecond))
	h.Push(t, repo, "3.20", Image(t, 64, 1))
	h.Push(t, "library/busybox", "1", Image(t, 64, 1))

	t.Run("no token gets a bearer challenge", func(t *testing.T) {
		resp, body := do(t, http.MethodGet, h.URL()+"/v2/"+repo+"/manifests/3.20", "")
		want := `Bearer realm="` + h.URL() + `/token",service="registry.docker.io",scope="repository:library/alpine:pull"`
		if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != want || !strings.Contains(body, `"code":"UNAUTHORIZED"`) {
			t.Fatalf("= %d %q %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
		}
		resp, _ = do(t, http.MethodGet, h.URL()+"/v2/", "")
		if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), `Bearer realm="`) {
			t.Fatalf("/v2/ = %d", resp.StatusCode)
		}
	})
	t.Run("wrong password is refused", func(t *testing.T) {
		if _, resp := fetchToken(t, h, "alice", "nope", repo); resp.StatusCode != 401 {
			t.Fatalf("status = %d", resp.StatusCode)
		}
		if !h.SawBasicAuth("alice") {
			t.Fatal("basic auth not recorded")
		}
	})
	t.Run("oauth password grant issues a token", func(t *testing.T) {
		form := url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"pw"},
			"service": {Service}, "scope": {"repository:" + repo + ":pull"}}
		resp, err := http.PostForm(h.URL()+"/token", form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var tr tokenResponse
		if err := json.NewDecoder(resp.Body).Decode(&tr); err != nil || resp.StatusCode != 200 || tr.AccessToken == "" || tr.ExpiresIn != 1 {
			t.Fatalf("= %d %+v %v", resp.StatusCode, tr, err)
		}
		form.Set("password", "nope")
		bad, err := http.PostForm(h.URL()+"/token", form)
		if err != nil {
			t.Fatal(err)
		}
		bad.Body.Close()
		if bad.StatusCode != 401 {
			t.Fatalf("wrong password = %d", bad.StatusCode)
		}
	})
	t.Run("token is scoped to its repository", func(t *testing.T) {
		tok, _ := fetchToken(t, h, "", "", repo)
		if resp, _ := do(t, http.MethodGet, h.URL()+"/v2/library/busybox/manifests/1", tok); resp.StatusCode != 401 {
			t.Fatalf("other repo = %d", resp.StatusCode)
		}
		if resp, _ := do(t, http.MethodGet, h.URL()+"/v2/", tok); resp.StatusCode != 200 {
			t.Fatalf("/v2/ with token = %d", resp.StatusCode)
		}
	})
	t.Run("token expires", func(t *testing.T) {
		tok, resp := fetchToken(t, h, "alice", "pw", repo)
		if resp.StatusCode != 200 || tok == "" {
			t.Fatalf("token status = %d", resp.StatusCode)
		}
		murl := h.URL() + "/v2/" + repo + "/manifests/3.20"
		if resp, _ := do(t, http.MethodHead, murl, tok); resp.StatusCode != 200 {
			t.Fatalf("fresh token = %d", resp.StatusCode)
		}
		time.Sleep(400 * time.Millisecond)
		if resp, _ := do(t, http.MethodHead, murl, tok); resp.StatusCode != 401 {
			t.Fatalf("expired token = %d", resp.StatusCode)
		}
	})
	t.Run("push is refused on the public port", func(t *testing.T) {
		err := remote.Write(ref(t, h, "library/evil", "x"), Image(t, 64, 1))
		if err == nil {
			t.Fatal("push succeeded")
		}
	})
	t.Run("ggcr with basic auth pulls on the account's bucket", func(t *testing.T) {
		_, err := remote.Image(ref(t, h, repo, "3.20"), remote.WithAuth(&authn.Basic{Username: "alice", Password: "pw"}))
		if err != nil {
			t.Fatal(err)
		}
		if h.Pulls("alice") != 1 || h.Pulls("127.0.0.1") != 0 {
			t.Fatalf("pulls alice=%d anon=%d", h.Pulls("alice"), h.Pulls("127.0.0.1"))
		}
	})
}

func TestFaults(t *testing.T) {
	h := Start(t)
	img := Image(t, 1<<20, 1)
	h.Push(t, repo, "big", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()

	t.Run("outage answers 503", func(t *testing.T) {
		h.SetOutage(true)
		defer h.SetOutage(false)
		for _, p := range []string{"/v2/", "/token", "/v2/" + repo + "/manifests/big"} {
			if resp, _ := do(t, http.MethodGet, h.URL()+p, ""); resp.StatusCode != 503 {
				t.Fatalf("%s = %d", p, resp.StatusCode)
			}
		}
	})
	t.Run("dropped connections fail the request", func(t *testing.T) {
		h.SetDropConnections(true)
		defer h.SetDropConnections(false)
		resp, err := http.Get(h.URL() + "/v2/")
		if err == nil {
			resp.Body.Close()
			t.Fatalf("got a response: %d", resp.StatusCode)
		}
	})
	t.Run("corrupted blob fails digest verification", func(t *testing.T) {
		h.CorruptBlob(DigestOf(ld), true)
		defer h.CorruptBlob(DigestOf(ld), false)
		pulled, err := remote.Image(ref(t, h, repo, "big"))
		if err != nil {
			t.Fatal(err)
		}
		pl, _ := pulled.Layers()
		rc, err := pl[0].Compressed()
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, rc)
		if err == nil {
			err = rc.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "checksum") {
			t.Fatalf("read %d bytes, err = %v; want a digest mismatch", n, err)
		}
		size, _ := layers[0].Size()
		if n != size {
			t.Fatalf("corrupted length %d, want %d", n, size)
		}
	})
	t.Run("bandwidth throttles a 1 MiB blob", func(t *testing.T) {
		tok, _ := fetchToken(t, h, "", "", repo)
		h.SetBandwidth(1 << 20)
		defer h.SetBandwidth(0)
		start := time.Now()
		resp, body := do(t, http.MethodGet, h.URL()+"/v2/"+repo+"/blobs/"+ld.String(), tok)
		took := time.Since(start)
		if resp.StatusCode != 200 || len(body) < 1<<20 {
			t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
		}
		if took < 500*time.Millisecond {
			t.Fatalf("took %v at 1 MiB/s", took)
		}
	})
	t.Run("latency delays the answer", func(t *testing.T) {
		h.SetLatency(200 * time.Millisecond)
		defer h.SetLatency(0)
		start := time.Now()
		do(t, http.MethodGet, h.URL()+"/v2/", "")
		if took := time.Since(start); took < 200*time.Millisecond {
			t.Fatalf("took %v", took)
		}
	})
	if c := h.Counts(); c.Outage < 4 {
		t.Fatalf("outage count = %d, want >= 4", c.Outage)
	}
}
