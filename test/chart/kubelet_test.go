package chart

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// pauseRef is the sandbox image the nodes' containerd pins; the test builds it.
const pauseRef = "registry.k8s.io/pause:3.10"

// TestKubeletCluster installs the chart on a real two-node cluster (kubelets
// on containerd's CRI, runc, the bridge CNI plugin, kube-proxy, CoreDNS) and
// runs pods through it: the first pull of an image comes from the hub
// through the cache tier, the same image on the other node comes from the
// first node while the hub is down, an image volume holding an OCI artifact
// is shared the same way, upgrade keeps the generated secrets, and uninstall
// restores every node's hosts.toml.
func TestKubeletCluster(t *testing.T) {
	helm := helmBin(t)
	oras := harness.Binary(t, "SHOAL_ORAS_BIN", "oras")
	work := t.TempDir()

	pauseBin := filepath.Join(work, "pause")
	build := exec.Command("go", "build", "-trimpath", "-o", pauseBin, "./testdata/pause")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build pause: %v\n%s", err, out)
	}
	pauseImg := pauseImage(t, pauseBin)
	// The shoal image as test/image builds it (static, -tags nocloud,nocache
	// for the node), for this machine's platform only.
	shoalLayout := filepath.Join(work, "shoal-image")
	img := exec.Command("go", "run", "./test/image", "-o", shoalLayout, "--platforms", "linux/amd64", "--version", "dev")
	img.Dir = "../.."
	if out, err := img.CombinedOutput(); err != nil {
		t.Fatalf("build the shoal image: %v\n%s", err, out)
	}
	lp, err := layout.FromPath(shoalLayout)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("shoal image layout: %v (%d entries)", err, len(im.Manifests))
	}
	shoalIdx, err := idx.ImageIndex(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	c := startKubeCluster(t, 2, pauseRef,
		harness.WriteOCILayoutTar(t, pauseImg, pauseRef),
		harness.WriteOCIIndexLayoutTar(t, shoalIdx, "ghcr.io/shoal-oci/shoal:dev"))
	n1, n2 := c.nodes[0], c.nodes[1]

	h := hub.Start(t, hub.WithListenAddr(c.gw+":0"), hub.WithAccount("shoal", "hub-pass", 1000))
	app1, app2 := appImage(t, pauseImg, 8<<20), appImage(t, pauseImg, 8<<20)
	h.Push(t, "library/app1", "v1", app1)
	h.Push(t, "library/app2", "v1", app2)
	model, modelLayer, modelDigest := pushModel(t, h, oras, work, 6<<20)

	// A hosts.toml the cluster had before shoal: uninstall must bring it back.
	before := map[*kubeNode]map[string]string{}
	for _, n := range c.nodes {
		writeFile(t, n.host("/etc/containerd/certs.d/quay.io/hosts.toml"), "server = \"https://quay.io\"\n# the operator's own\n")
		before[n] = tree(t, n.host("/etc/containerd/certs.d"))
	}

	values := filepath.Join(work, "values.yaml")
	writeFile(t, values, fmt.Sprintf(`image: {repository: ghcr.io/shoal-oci/shoal, tag: dev, pullPolicy: Never}
logLevel: debug
credentials:
  dockerconfigjson: '%s'
cache:
  upstreams: ["docker.io=%s"]
  persistence: {enabled: false}
`, dockerConfig("docker.io", "shoal", "hub-pass"), h.URL()))
	helmRun := func(args ...string) string {
		t.Helper()
		out, err := run(t, c.env, helm, args...)
		if err != nil {
			c.dump(t)
			t.Fatal(err)
		}
		return out
	}
	// 1. The DaemonSet and the cache Deployment come up Ready, and each
	// node's init container wrote hosts.toml where its containerd reads it.
	helmRun("install", "shoal", "../../charts/shoal", "--namespace", "shoal", "--create-namespace", "-f", values, "--wait", "--timeout", "4m")
	for _, n := range c.nodes {
		b, err := os.ReadFile(n.host("/etc/containerd/certs.d/docker.io/hosts.toml"))
		if err != nil || !strings.Contains(string(b), "http://127.0.0.1:5000") {
			t.Fatalf("%s: docker.io hosts.toml: %v\n%s", n.name, err, b)
		}
	}

	// 2. A pod on node 1 starts with an image from the hub.
	keys := c.nodeMetric(t, n1, "shoal_node_advertised_keys")
	c.runPod(t, "a1", n1, "docker.io/library/app1:v1")
	if got := h.Pulls("shoal"); got != 1 {
		t.Errorf("hub counted %d pulls for app1, want 1", got)
	}

	// 3. The hub goes down; the same image starts on node 2 from node 1.
	c.waitAdvertised(t, n1, keys)
	h.SetOutage(true)
	peerBefore := c.nodeMetric(t, n2, "shoal_node_served_bytes_total", `source="peer"`)
	c.runPod(t, "b1", n2, "docker.io/library/app1:v1")
	// The pause layer is on every node already: the app layer is what moves.
	own := mustLayers(t, app1)[1]
	size, _ := own.Size()
	if got := c.nodeMetric(t, n2, "shoal_node_served_bytes_total", `source="peer"`) - peerBefore; got < float64(size) {
		t.Errorf("node2 relayed %.0f bytes from peers for app1, want at least its %d-byte layer\n%s", got, size, c.nodeMetrics(t, n2))
	}
	if got := c.nodeMetric(t, n2, "shoal_node_requests_total", `source="cache"`, `kind="blob"`); got != 0 {
		t.Errorf("node2 fetched %.0f blobs from the cache tier while node1 held them", got)
	}
	h.SetOutage(false)

	// 4. A new image on node 2 comes through the cache tier: one counted pull.
	c.runPod(t, "c2", n2, "docker.io/library/app2:v1")
	if got := h.Pulls("shoal"); got != 2 {
		t.Errorf("hub counted %d pulls after app2, want 2", got)
	}
	if d, _ := mustLayers(t, app2)[1].Digest(); h.BlobGETs(hub.DigestOf(d)) != 1 {
		t.Errorf("hub served app2's layer %s %d times, want 1", d, h.BlobGETs(hub.DigestOf(d)))
	}

	// 5. helm upgrade keeps the PSK and the client token.
	psk := secretData(t, c.env, c.kubectl, "shoal", "shoal-psk", "swarm.key")
	tok := secretData(t, c.env, c.kubectl, "shoal", "shoal-cache-token", "token")
	helmRun("upgrade", "shoal", "../../charts/shoal", "--namespace", "shoal", "--reuse-values", "--set", "logLevel=info", "--wait", "--timeout", "4m")
	// helm's --wait can return while the DaemonSet still rolls (one node at
	// a time); the next steps read both nodes' metrics.
	c.kc(t, "-n", "shoal", "rollout", "status", "daemonset/shoal-node", "--timeout=180s")
	c.kc(t, "-n", "shoal", "rollout", "status", "deployment/shoal-cache", "--timeout=180s")
	if got := secretData(t, c.env, c.kubectl, "shoal", "shoal-psk", "swarm.key"); got != psk || psk == "" {
		t.Errorf("upgrade changed the PSK")
	}
	if got := secretData(t, c.env, c.kubectl, "shoal", "shoal-cache-token", "token"); got != tok || tok == "" {
		t.Errorf("upgrade changed the cache client token")
	}

	// 6. An image volume holding an OCI artifact (a model file, not a
	// runnable image) mounts on node 1 through shoal, then on node 2 from
	// node 1.
	keys = c.nodeMetric(t, n1, "shoal_node_advertised_keys")
	c.runModelPod(t, "m1", n1, model, modelDigest)
	c.waitAdvertised(t, n1, keys)
	peerBefore = c.nodeMetric(t, n2, "shoal_node_served_bytes_total", `source="peer"`)
	c.runModelPod(t, "m2", n2, model, modelDigest)
	if got := c.nodeMetric(t, n2, "shoal_node_served_bytes_total", `source="peer"`) - peerBefore; got < 6<<20 {
		t.Errorf("node2 relayed %.0f bytes from peers for the model, want at least its 6 MiB\n%s", got, c.nodeMetrics(t, n2))
	}
	if got := h.BlobGETs(digest.Digest(modelLayer)); got != 1 {
		t.Errorf("hub served the model layer %d times, want 1", got)
	}

	// 7. helm uninstall leaves every node's hosts.toml as it was before.
	c.kc(t, "delete", "pod", "--all", "--wait=true", "--timeout=60s")
	helmRun("uninstall", "shoal", "--namespace", "shoal", "--wait", "--timeout", "2m")
	for _, n := range c.nodes {
		harness.Eventually(t, 60*time.Second, n.name+": certs.d back to what it was before the install", func() error {
			if got, want := tree(t, n.host("/etc/containerd/certs.d")), before[n]; fmt.Sprint(got) != fmt.Sprint(want) {
				return fmt.Errorf("now:\n%v\nbefore the install:\n%v", got, want)
			}
			return nil
		})
	}
}

// pauseImage is an OCI image holding the static pause binary as /pause, its
// entrypoint.
func pauseImage(t *testing.T, bin string) v1.Image {
	t.Helper()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		OS: "linux", Architecture: "amd64",
		Config: v1.Config{Entrypoint: []string{"/pause"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.AppendLayers(img, static.NewLayer(tarOf(t, "pause", b, 0o755), types.OCIUncompressedLayer))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// appImage is base with one more layer of size random bytes.
func appImage(t *testing.T, base v1.Image, size int64) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(base, harness.RandomLayer(t, size))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// tarOf is a tar holding one file.
func tarOf(t *testing.T, name string, content []byte, mode int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(content); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// pushModel pushes, with oras, an OCI artifact that holds one model file of
// size random bytes: artifactType application/vnd.shoal.model.v1, one plain
// tar layer, and an image config with no command (what containerd's image
// volumes unpack). It returns the reference the pods use, the layer's
// digest and the file's digest.
func pushModel(t *testing.T, h *hub.Hub, oras, dir string, size int) (ref, layerDigest, fileDigest string) {
	t.Helper()
	file := make([]byte, size)
	_, _ = rand.Read(file)
	layer := tarOf(t, "model.bin", file, 0o644)
	layerPath := filepath.Join(dir, "model.tar")
	writeFile(t, layerPath, string(layer))
	cfg, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{fmt.Sprintf("sha256:%x", sha256.Sum256(layer))}},
	})
	cfgPath := filepath.Join(dir, "model-config.json")
	writeFile(t, cfgPath, string(cfg))
	cmd := exec.Command(oras, "push", "--plain-http", "--disable-path-validation",
		"--artifact-type", "application/vnd.shoal.model.v1",
		"--config", "model-config.json:application/vnd.oci.image.config.v1+json",
		h.AdminHost()+"/library/model:v1", "model.tar:application/vnd.oci.image.layer.v1.tar")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("oras push: %v\n%s", err, out)
	}
	return "docker.io/library/model:v1", fmt.Sprintf("sha256:%x", sha256.Sum256(layer)), fmt.Sprintf("sha256:%x", sha256.Sum256(file))
}

func mustLayers(t *testing.T, img v1.Image) []v1.Layer {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

// imageLayerBytes is the sum of img's layer sizes.
func imageLayerBytes(t *testing.T, img v1.Image) int64 {
	t.Helper()
	var n int64
	for _, l := range mustLayers(t, img) {
		s, err := l.Size()
		if err != nil {
			t.Fatal(err)
		}
		n += s
	}
	return n
}

// tree maps each file under dir to its content.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		m[strings.TrimPrefix(p, dir)] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// podYAML is a pod pinned to node by the scheduler's node selector.
func podYAML(name string, node *kubeNode, image string, args []string, volumes string) string {
	a, _ := json.Marshal(args)
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: default}
spec:
  nodeSelector: {kubernetes.io/hostname: %s}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: %s
      imagePullPolicy: IfNotPresent
      args: %s
%s`, name, node.name, image, a, volumes)
}

// runPod starts a pod with image on node and waits until it is Ready.
func (c *kubeCluster) runPod(t *testing.T, name string, node *kubeNode, image string) {
	t.Helper()
	c.startPod(t, name, podYAML(name, node, image, nil, ""))
}

// runModelPod starts a pod on node that mounts the image volume model and
// checks, from the pod's own log, that the file in it has digest want.
func (c *kubeCluster) runModelPod(t *testing.T, name string, node *kubeNode, model, want string) {
	t.Helper()
	vol := fmt.Sprintf(`      volumeMounts: [{name: model, mountPath: /models}]
  volumes:
    - name: model
      image: {reference: %s, pullPolicy: IfNotPresent}
`, model)
	c.startPod(t, name, podYAML(name, node, "docker.io/library/app1:v1", []string{"/models/model.bin"}, vol))
	harness.Eventually(t, 30*time.Second, fmt.Sprintf("pod %s on %s: the image volume's model.bin has digest %s", name, node.name, want), func() error {
		out, err := run(t, c.env, c.kubectl, "logs", name)
		if err != nil {
			return err
		}
		if !strings.Contains(out, want+" /models/model.bin") {
			return fmt.Errorf("the pod logged %q", out)
		}
		return nil
	})
}

// startPod applies a pod manifest, retrying while the namespace's default
// service account is not there yet, and waits for the pod to be Ready.
func (c *kubeCluster) startPod(t *testing.T, name, manifest string) {
	t.Helper()
	harness.Eventually(t, 60*time.Second, "create pod "+name, func() error {
		cmd := exec.Command(c.kubectl, "apply", "-f", "-")
		cmd.Env = append(os.Environ(), c.env...)
		cmd.Stdin = strings.NewReader(manifest)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%w\n%s", err, out)
		}
		return nil
	})
	if _, err := run(t, c.env, c.kubectl, "wait", "--for=condition=Ready", "pod/"+name, "--timeout=180s"); err != nil {
		c.dump(t)
		t.Fatalf("pod %s not Ready: %v", name, err)
	}
}

// waitAdvertised waits until node's shoal advertises more keys than
// before and their number held for two scrapes a second apart, so that a
// lookup from another node finds what node pulled last.
func (c *kubeCluster) waitAdvertised(t *testing.T, node *kubeNode, before float64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	last, stable := -1.0, 0
	for time.Now().Before(deadline) {
		keys := c.nodeMetric(t, node, "shoal_node_advertised_keys")
		if keys == last {
			stable++
		} else {
			stable = 0
		}
		last = keys
		if stable >= 2 && keys > before {
			return
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("%s: advertised keys did not grow past %v and settle (last %v)", node.name, before, last)
}

// dump logs what the cluster shows about its pods and events.
func (c *kubeCluster) dump(t *testing.T) {
	t.Helper()
	for _, args := range [][]string{
		{"get", "nodes,pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		{"logs", "-n", "shoal", "-l", "app.kubernetes.io/component=node", "--all-containers", "--tail=40", "--prefix"},
		{"logs", "-n", "shoal", "-l", "app.kubernetes.io/component=cache", "--tail=40", "--prefix"},
	} {
		out, _ := run(t, c.env, c.kubectl, args...)
		t.Logf("kubectl %s:\n%s", strings.Join(args, " "), tail(out, 6000))
	}
}
