package cache_e2e

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

const (
	hubUser = "shoal-robot"
	hubPass = "pw-Zq81xKv7NmW3-secret"
)

// dockerConfig is a docker config.json holding user:pass for host.
func dockerConfig(host, user, pass string) string {
	return fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, base64.StdEncoding.EncodeToString([]byte(user+":"+pass)))
}

// writeSecretMount lays out a kubernetes.io/dockerconfigjson Secret the way
// the kubelet mounts it: a timestamped directory, a ..data symlink to it,
// and .dockerconfigjson as a symlink through ..data.
func writeSecretMount(t *testing.T, cfg string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "secret")
	ts := filepath.Join(dir, "..2025_01_01_00_00_00.000000001")
	if err := os.MkdirAll(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ts, ".dockerconfigjson"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("..data", ".dockerconfigjson"), filepath.Join(dir, ".dockerconfigjson")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// emptyLayout writes an OCI image layout with no images: a node serving it
// holds nothing, so everything goes to the cache tier.
func emptyLayout(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for f, s := range map[string]string{
		"oci-layout": `{"imageLayoutVersion":"1.0.0"}`,
		"index.json": `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`,
	} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestCredentialsReachUpstreamButNothingElse: credentials from a docker
// config.json and from a mounted dockerconfigjson Secret reach upstream (the
// pulls count against that account), but never appear in a log line, a
// metric, a response header or body, or anywhere a node can see them.
func TestCredentialsReachUpstreamButNothingElse(t *testing.T) {
	h := hub.Start(t, hub.WithAccount(hubUser, hubPass, 50))
	img := harness.RandomImage(t, 2, 4096)
	h.Push(t, "library/app", "v1", img)
	h.Push(t, "library/other", "v1", harness.RandomImage(t, 1, 1024))
	want := imageContent(t, img)
	secrets := []string{hubPass, base64.StdEncoding.EncodeToString([]byte(hubUser + ":" + hubPass)),
		base64.StdEncoding.EncodeToString([]byte(hubPass))}

	cfgFile := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfgFile, []byte(dockerConfig(h.Host(), hubUser, hubPass)), 0o600); err != nil {
		t.Fatal(err)
	}
	fromFile := startCache(t, h, cacheOpts{name: "config-json", args: []string{"--credentials-file", cfgFile}})
	fromSecret := startCache(t, h, cacheOpts{name: "secret-dir", args: []string{"--credentials-file", writeSecretMount(t, dockerConfig(h.Host(), hubUser, hubPass))}})
	// A wrong password must not leak either, in the refusal the client gets.
	const wrongPass = "wrong-Pw-5tUv0-secret"
	wrongFile := filepath.Join(t.TempDir(), "wrong.json")
	if err := os.WriteFile(wrongFile, []byte(dockerConfig(h.Host(), hubUser, wrongPass)), 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := startCache(t, h, cacheOpts{name: "wrong", args: []string{"--credentials-file", wrongFile}})
	secrets = append(secrets, wrongPass, base64.StdEncoding.EncodeToString([]byte(hubUser+":"+wrongPass)))

	rec := &recorder{next: http.DefaultTransport.(*http.Transport).Clone()}
	ctx := context.Background()
	for _, c := range []*cacheProc{fromFile, fromSecret} {
		got, err := ggcrPullVia(ctx, rec, c.addr, "library/app", "v1", h.Host())
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if err := want.same(got); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	if !h.SawBasicAuth(hubUser) {
		t.Fatal("the hub never saw the account's basic auth")
	}
	if n := h.Pulls(hubUser); n != 2 {
		t.Fatalf("pulls counted against %s = %d, want 2 (one per cache)", hubUser, n)
	}
	if n := h.Pulls("127.0.0.1"); n != 0 {
		t.Fatalf("%d pulls counted anonymously: the credentials were not used", n)
	}
	// What else a client may see: the base, a HEAD, unknown content, a refusal.
	for _, c := range []*cacheProc{fromFile, fromSecret, wrong} {
		for _, p := range []string{"/v2/", "/v2/library/app/manifests/v1", "/v2/library/nope/manifests/v1", "/v2/library/other/manifests/v1"} {
			for _, m := range []string{"GET", "HEAD"} {
				req, _ := http.NewRequest(m, nsURL(c.url(), p, h.Host()), nil)
				if resp, err := (&http.Client{Transport: rec}).Do(req); err == nil {
					resp.Body.Close()
				}
			}
		}
	}
	if !strings.Contains(rec.String(), "DENIED") {
		t.Errorf("the cache with a wrong password did not report a refusal:\n%s", rec.String())
	}

	// A node in front of the cache: it pulls through it and must never see them.
	node := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: requireShoal(t), Name: "N", LayoutDir: emptyLayout(t), NoRouter: true,
		Registries: []string{h.Host()}, Args: []string{"--cache-url", fromFile.url()},
	})
	got, err := ggcrPullVia(ctx, rec, node.RegistryAddr, "library/app", "v1", h.Host())
	if err != nil {
		t.Fatalf("pull through the node: %v", err)
	}
	if err := want.same(got); err != nil {
		t.Fatalf("pull through the node: %v", err)
	}
	if n := node.Metric(t, "shoal_node_requests_total", `source="cache"`); n < 1 {
		t.Fatalf("node requests served from the cache tier = %v", n)
	}

	places := map[string]string{
		"client responses": rec.String(),
		"node log":         node.Log(),
	}
	resp, body := do(t, "GET", "http://"+node.MetricsAddr+"/metrics")
	places["node metrics"] = fmt.Sprint(resp.Header) + string(body)
	for _, c := range []*cacheProc{fromFile, fromSecret, wrong} {
		places[c.name+" log"] = c.log()
		places[c.name+" metrics"] = c.metrics(t)
	}
	for where, text := range places {
		if text == "" {
			t.Errorf("%s is empty: nothing was checked", where)
		}
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("a credential (%d chars) appears in the %s", len(s), where)
			}
		}
	}
	// The account name is not secret: the budget metrics say whose budget it is.
	if !strings.Contains(places["config-json metrics"], `account="`+hubUser+`"`) {
		t.Errorf("the budget metrics do not name the account %s", hubUser)
	}
}
