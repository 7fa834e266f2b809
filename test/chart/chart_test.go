// Package chart tests the Helm chart in charts/shoal: lint, a matrix of
// rendered values, golden files for the workloads, the container args
// against the real binary's flags, the Grafana dashboards against the metric
// names the real processes export, and install/upgrade against a real
// kube-apiserver.
package chart

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/shoal-oci/shoal/test/harness"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

const (
	chartDir = "../../charts/shoal"
	// credMarker is the password in testdata/dockerconfig.json; credB64 is
	// the "auth" field that carries it. Neither may appear outside the
	// credentials Secret.
	credMarker = "s3cr3t-cred-marker-7f3a"
	credB64    = "c2hvYWwtdGVzdC11c2VyOnMzY3IzdC1jcmVkLW1hcmtlci03ZjNh"
	// redisMarker is the external Redis password in external-redis.yaml.
	redisMarker = "redis-password-marker"
)

// matrixCase is one set of values the chart must render and install with.
type matrixCase struct {
	name        string
	credentials bool // also pass --set-file credentials=testdata/dockerconfig.json
}

var matrix = []matrixCase{
	{name: "defaults"},
	{name: "cache-replicas-3-redis", credentials: true},
	{name: "external-redis", credentials: true},
	{name: "existing-secret"},
	{name: "psk-off", credentials: true},
	{name: "servicemonitor-on", credentials: true},
}

func (c matrixCase) helmArgs() []string {
	args := []string{"-f", filepath.Join("testdata", "values", c.name+".yaml")}
	if c.credentials {
		args = append(args, "--set-file", "credentials=testdata/dockerconfig.json")
	}
	return args
}

func helmBin(t *testing.T) string {
	t.Helper()
	return harness.Binary(t, "SHOAL_HELM_BIN", "helm")
}

// run runs a command and returns its stdout, or an error holding stderr.
func run(t *testing.T, env []string, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", filepath.Base(name), strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

// render runs helm template for a case with extra args.
func render(t *testing.T, extra ...string) (string, error) {
	t.Helper()
	args := append([]string{"template", "rel", chartDir, "-n", "shoal"}, extra...)
	return run(t, nil, helmBin(t), args...)
}

// object is one rendered Kubernetes object.
type object map[string]any

func (o object) kind() string { s, _ := o["kind"].(string); return s }
func (o object) name() string {
	m, _ := o["metadata"].(map[string]any)
	s, _ := m["name"].(string)
	return s
}

func parseObjects(t *testing.T, manifest string) []object {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(manifest))
	var objs []object
	for {
		var o map[string]any // not object: yaml.v3 would reuse the named type for nested maps
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("rendered YAML does not parse: %v", err)
		}
		if o != nil {
			objs = append(objs, object(o))
		}
	}
	return objs
}

func find(objs []object, kind, name string) object {
	for _, o := range objs {
		if o.kind() == kind && (name == "" || o.name() == name) {
			return o
		}
	}
	return nil
}

// container is the part of a container spec the tests read.
type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string         `yaml:"name"`
		Value     *string        `yaml:"value"`
		ValueFrom map[string]any `yaml:"valueFrom"`
	} `yaml:"env"`
	Lifecycle struct {
		PreStop struct {
			Exec struct {
				Command []string `yaml:"command"`
			} `yaml:"exec"`
		} `yaml:"preStop"`
	} `yaml:"lifecycle"`
}

// containers returns every container and init container of a workload.
func containers(t *testing.T, o object) []container {
	t.Helper()
	var w struct {
		Spec struct {
			Template struct {
				Spec struct {
					InitContainers []container `yaml:"initContainers"`
					Containers     []container `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	b, err := yaml.Marshal(map[string]any(o))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &w); err != nil {
		t.Fatal(err)
	}
	return append(w.Spec.Template.Spec.InitContainers, w.Spec.Template.Spec.Containers...)
}

func TestLint(t *testing.T) {
	helm := helmBin(t)
	if out, err := run(t, nil, helm, "lint", "--strict", chartDir); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	for _, c := range matrix {
		args := append([]string{"lint", "--strict", chartDir}, c.helmArgs()...)
		if out, err := run(t, nil, helm, args...); err != nil {
			t.Errorf("helm lint %s: %v\n%s", c.name, err, out)
		}
	}
}

func TestTemplateMatrix(t *testing.T) {
	checks := map[string]func(t *testing.T, objs []object, manifest string){
		"defaults": func(t *testing.T, objs []object, manifest string) {
			for _, kn := range [][2]string{
				{"DaemonSet", "rel-shoal-node"}, {"Deployment", "rel-shoal-cache"}, {"Service", "rel-shoal-cache"},
				{"Service", "rel-shoal-node-bootstrap"}, {"PodDisruptionBudget", "rel-shoal-cache"},
				{"Secret", "rel-shoal-psk"}, {"Secret", "rel-shoal-cache-token"}, {"NetworkPolicy", "rel-shoal-node"},
				{"PersistentVolumeClaim", "rel-shoal-cache"},
			} {
				if find(objs, kn[0], kn[1]) == nil {
					t.Errorf("no %s %s", kn[0], kn[1])
				}
			}
			if find(objs, "ServiceMonitor", "") != nil {
				t.Error("ServiceMonitor rendered without the CRD")
			}
			if find(objs, "Deployment", "rel-shoal-redis") != nil {
				t.Error("Redis rendered for one cache replica")
			}
			svc := find(objs, "Service", "rel-shoal-node-bootstrap")
			spec := svc["spec"].(map[string]any)
			if spec["clusterIP"] != "None" || spec["publishNotReadyAddresses"] != true {
				t.Errorf("bootstrap Service is not headless with publishNotReadyAddresses: %v", spec)
			}
			dashboards := 0
			for _, o := range objs {
				if o.kind() == "ConfigMap" {
					labels := o["metadata"].(map[string]any)["labels"].(map[string]any)
					if labels["grafana_dashboard"] == "1" {
						dashboards++
					}
				}
			}
			if dashboards != 2 {
				t.Errorf("%d dashboard ConfigMaps with grafana_dashboard=1, want 2", dashboards)
			}
			if strings.Contains(manifest, "kubernetes.io/dockerconfigjson") {
				t.Error("a credentials Secret rendered without credentials")
			}
		},
		"cache-replicas-3-redis": func(t *testing.T, objs []object, _ string) {
			if find(objs, "Deployment", "rel-shoal-redis") == nil || find(objs, "Service", "rel-shoal-redis") == nil {
				t.Error("built-in Redis not rendered")
			}
			args := strings.Join(containers(t, find(objs, "Deployment", "rel-shoal-cache"))[0].Args, " ")
			if !strings.Contains(args, "--redis-url=redis://rel-shoal-redis:6379/0") {
				t.Errorf("cache args lack the built-in Redis: %s", args)
			}
			pdb := find(objs, "PodDisruptionBudget", "")["spec"].(map[string]any)
			if pdb["minAvailable"] != 1 {
				t.Errorf("PDB for 3 replicas: %v", pdb)
			}
			if c := containers(t, find(objs, "Deployment", "rel-shoal-cache"))[0]; !strings.Contains(strings.Join(c.Args, " "), "--credentials-file=/etc/shoal/credentials/.dockerconfigjson") {
				t.Errorf("credentials not mounted as a file: %v", c.Args)
			}
		},
		"external-redis": func(t *testing.T, objs []object, manifest string) {
			// Three replicas on S3 sharing an external Redis behind Sentinel.
			if find(objs, "Deployment", "rel-shoal-redis") != nil {
				t.Error("built-in Redis rendered with an external URL")
			}
			if r := find(objs, "Deployment", "rel-shoal-cache")["spec"].(map[string]any)["replicas"]; r != 3 {
				t.Errorf("cache replicas = %v, want 3", r)
			}
			c := containers(t, find(objs, "Deployment", "rel-shoal-cache"))[0]
			if strings.Contains(strings.Join(c.Args, " "), "redis") {
				t.Errorf("Redis URL in args: %v", c.Args)
			}
			found := false
			for _, e := range c.Env {
				if e.Name == "SHOAL_REDIS_URL" && e.ValueFrom["secretKeyRef"] != nil {
					found = true
				}
			}
			if !found {
				t.Error("SHOAL_REDIS_URL does not come from a Secret")
			}
			if !strings.Contains(strings.Join(c.Args, " "), "--storage=s3 --storage-opt=bucket=shoal-cache --storage-opt=region=eu-west-1") {
				t.Errorf("s3 storage args: %v", c.Args)
			}
			if find(objs, "PersistentVolumeClaim", "") != nil {
				t.Error("PVC rendered for object storage")
			}
			if strings.Contains(manifest, redisMarker) {
				t.Error("the Redis password is rendered in clear text")
			}
		},
		"existing-secret": func(t *testing.T, objs []object, manifest string) {
			if strings.Contains(manifest, "type: kubernetes.io/dockerconfigjson") {
				t.Error("a credentials Secret rendered despite existingSecret")
			}
			if !strings.Contains(manifest, "secretName: regcred") {
				t.Error("the existing Secret is not mounted")
			}
		},
		"psk-off": func(t *testing.T, objs []object, manifest string) {
			if find(objs, "Secret", "rel-shoal-psk") != nil || strings.Contains(manifest, "--psk-file") {
				t.Error("PSK rendered while disabled")
			}
		},
		"servicemonitor-on": func(t *testing.T, objs []object, _ string) {
			if find(objs, "ServiceMonitor", "rel-shoal") == nil {
				t.Error("no ServiceMonitor")
			}
		},
	}
	for _, c := range matrix {
		t.Run(c.name, func(t *testing.T) {
			manifest, err := render(t, c.helmArgs()...)
			if err != nil {
				t.Fatal(err)
			}
			objs := parseObjects(t, manifest)
			for _, o := range objs {
				if o.kind() == "Secret" {
					continue
				}
				b, _ := yaml.Marshal(map[string]any(o))
				if strings.Contains(string(b), credMarker) || strings.Contains(string(b), credB64) {
					t.Errorf("credentials rendered into %s %s", o.kind(), o.name())
				}
			}
			checks[c.name](t, objs, manifest)
		})
	}
}

func TestTemplateRefusesBadValues(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"replicas_without_redis", []string{"--set", "cache.replicas=3,cache.persistence.accessModes={ReadWriteMany}"}, "needs Redis"},
		{"replicas_on_rwo_volume", []string{"--set", "cache.replicas=2,redis.enabled=true"}, "shared volume"},
		{"both_redis_kinds", []string{"--set", "redis.enabled=true,redis.url=redis://r:6379"}, "not both"},
		{"unknown_log_level", []string{"--set", "logLevel=loud"}, "logLevel"},
		{"unknown_storage_driver", []string{"--set", "cache.storage.driver=ftp"}, "driver"},
		{"unknown_value", []string{"--set", "cache.replica=2"}, "replica"},
		{"negative_herd_direct", []string{"--set", "cache.herdDirect=-1"}, "herdDirect"},
		{"evict_interval_not_a_duration", []string{"--set", "cache.evictInterval=often"}, "evictInterval"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("render error = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestGolden pins the rendered node DaemonSet and cache Deployment
// (go test ./test/chart -run TestGolden -update rewrites them).
func TestGolden(t *testing.T) {
	for _, c := range []matrixCase{{name: "defaults"}, {name: "cache-replicas-3-redis", credentials: true}} {
		manifest, err := render(t, c.helmArgs()...)
		if err != nil {
			t.Fatal(err)
		}
		objs := parseObjects(t, manifest)
		for _, kn := range [][2]string{{"DaemonSet", "rel-shoal-node"}, {"Deployment", "rel-shoal-cache"}} {
			o := find(objs, kn[0], kn[1])
			if o == nil {
				t.Fatalf("%s: no %s", c.name, kn[0])
			}
			got, err := yaml.Marshal(map[string]any(o))
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "golden", c.name+"-"+strings.ToLower(kn[0])+".yaml")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the golden file (run with -update if intended):\n%s", path, lineDiff(string(want), string(got)))
			}
		}
	}
}

func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "line %d:\n- %s\n+ %s\n", i+1, wl, gl)
		}
	}
	return b.String()
}

var (
	shoalOnce sync.Once
	shoalPath string
	shoalErr  error
)

// shoalBinary builds the shoal binary once per test run.
func shoalBinary(t *testing.T) string {
	t.Helper()
	shoalOnce.Do(func() {
		dir, err := os.MkdirTemp("", "shoal-chart-test-")
		if err != nil {
			shoalErr = err
			return
		}
		// With -race when the tests have it: the dashboards test runs it as a daemon.
		shoalPath, shoalErr = harness.BuildShoal(dir)
	})
	if shoalErr != nil {
		t.Fatal(shoalErr)
	}
	return shoalPath
}

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if shoalPath != "" {
		os.RemoveAll(filepath.Dir(shoalPath))
	}
	os.Exit(code)
}

// binaryFlags parses "  --name  [SHOAL_NAME] (default x)" lines out of
// `shoal <cmd> --help`, returning flag names and env twins.
func binaryFlags(t *testing.T, bin, cmd string) (flags, envs map[string]bool) {
	t.Helper()
	c := exec.Command(bin, cmd, "--help")
	out, _ := c.CombinedOutput() // --help exits non-zero (flag.ErrHelp)
	flags, envs = map[string]bool{}, map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && strings.HasPrefix(f[0], "--") && strings.HasPrefix(f[1], "[SHOAL_") {
			flags[strings.TrimPrefix(f[0], "--")] = true
			envs[strings.Trim(f[1], "[]")] = true
		}
	}
	if len(flags) == 0 {
		t.Fatalf("shoal %s --help lists no flags:\n%s", cmd, out)
	}
	return flags, envs
}

func TestContainerArgsAreBinaryFlags(t *testing.T) {
	bin := shoalBinary(t)
	type known struct{ flags, envs map[string]bool }
	cmds := map[string]known{}
	for _, cmd := range []string{"node", "configure", "cache"} {
		f, e := binaryFlags(t, bin, cmd)
		cmds[cmd] = known{f, e}
	}
	checkArgs := func(t *testing.T, where string, args []string) {
		t.Helper()
		if len(args) == 0 {
			t.Errorf("%s: no args", where)
			return
		}
		k, ok := cmds[args[0]]
		if !ok {
			t.Errorf("%s: unknown subcommand %q", where, args[0])
			return
		}
		for _, a := range args[1:] {
			if !strings.HasPrefix(a, "--") {
				t.Errorf("%s: %q is not a --flag", where, a)
				continue
			}
			name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			if !k.flags[name] {
				t.Errorf("%s: shoal %s has no flag --%s (it has %v)", where, args[0], name, sortedKeys(k.flags))
			}
		}
	}
	seen := 0
	for _, c := range matrix {
		manifest, err := render(t, append(c.helmArgs(), "--set", "node.registry.exposure=nodePort")...)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range parseObjects(t, manifest) {
			if o.kind() != "DaemonSet" && o.kind() != "Deployment" {
				continue
			}
			for _, ctr := range containers(t, o) {
				if !strings.Contains(ctr.Image, "shoal") || strings.Contains(ctr.Image, "redis") {
					continue
				}
				where := fmt.Sprintf("%s/%s %s/%s", c.name, o.name(), o.kind(), ctr.Name)
				checkArgs(t, where, ctr.Args)
				seen++
				for _, e := range ctr.Env {
					if strings.HasPrefix(e.Name, "SHOAL_") && !cmds[ctr.Args[0]].envs[e.Name] {
						t.Errorf("%s: env %s is no flag's twin", where, e.Name)
					}
				}
				if pre := ctr.Lifecycle.PreStop.Exec.Command; len(pre) > 0 {
					if pre[0] != "/shoal" && pre[0] != "/shoal-node" {
						t.Errorf("%s: preStop runs %q, not /shoal or /shoal-node", where, pre[0])
					}
					checkArgs(t, where+" preStop", pre[1:])
				}
			}
		}
	}
	if seen < len(matrix)*3 {
		t.Errorf("checked %d shoal containers, want at least %d", seen, len(matrix)*3)
	}
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
