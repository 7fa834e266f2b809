package chart

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/shoal-oci/shoal/test/harness"
)

// kubeCluster is a real Kubernetes cluster on this machine: etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler and CoreDNS in the
// test's network namespace, and nodes that each run containerd (with CRI,
// runc and the bridge CNI plugin), a kubelet and kube-proxy in a network and
// mount namespace of their own. The nodes share a bridge; the control plane
// listens on its address, gw.
type kubeCluster struct {
	api     *apiServer
	kubectl string
	env     []string
	gw      string // the bridge's address in the test's namespace
	nodes   []*kubeNode
}

// kubeNode is one node of a kubeCluster. Its containerd, kubelet and
// kube-proxy see the usual host paths (/run/containerd, /etc/containerd,
// /var/lib/kubelet, ...), bind-mounted from dir in the node's own mount
// namespace, so the chart's hostPath volumes work unchanged.
type kubeNode struct {
	name    string // the Kubernetes node name
	ip      string
	podCIDR string
	netns   string // network namespace name
	dir     string
	mntns   string // file holding the persistent mount namespace
	cgroup  string // the cgroup (v1) everything of the node runs under
	pause   string // the sandbox image ref
}

// host returns the path, in the test's namespace, of path as the node sees it.
func (n *kubeNode) host(path string) string {
	for _, b := range nodeBinds {
		if path == b || strings.HasPrefix(path, b+"/") {
			return filepath.Join(n.dir, "fs", b, strings.TrimPrefix(path, b))
		}
	}
	panic("kubeNode.host: " + path + " is not bind-mounted")
}

// nodeBinds are the host paths each node has its own copy of.
var nodeBinds = []string{
	"/run/containerd", "/var/lib/containerd", "/etc/containerd", "/var/lib/kubelet",
	"/var/lib/shoal", "/var/log/pods", "/var/log/containers", "/etc/cni/net.d", "/var/lib/cni",
	// containerd makes its pods' network namespaces here.
	"/run/netns",
}

// cgroupControllers are the cgroup v1 hierarchies a node's cgroup is made in.
var cgroupControllers = []string{"cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "systemd"}

// sh runs a command in the test's namespaces and fails the test on error.
func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// startKubeCluster starts the control plane and n nodes, and waits until
// every node is Ready. images are OCI layout tars imported into every
// node's containerd before its kubelet starts (the shoal image, the pause
// image); pause is the sandbox image's name among them.
func startKubeCluster(t *testing.T, n int, pause string, images ...string) *kubeCluster {
	t.Helper()
	harness.RequireRoot(t)
	bins := map[string]string{}
	for env, name := range map[string]string{
		"SHOAL_KUBELET_BIN": "kubelet", "SHOAL_KUBE_CONTROLLER_MANAGER_BIN": "kube-controller-manager",
		"SHOAL_KUBE_SCHEDULER_BIN": "kube-scheduler", "SHOAL_KUBE_PROXY_BIN": "kube-proxy",
		"SHOAL_KUBECTL_BIN": "kubectl", "SHOAL_COREDNS_BIN": "coredns",
		"SHOAL_CONTAINERD_BIN": "containerd", "SHOAL_CONTAINERD_SHIM_BIN": "containerd-shim-runc-v2",
		"SHOAL_CTR_BIN": "ctr",
	} {
		bins[name] = harness.Binary(t, env, name)
	}
	for _, tool := range []string{"runc", "iptables", "nsenter", "unshare", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			harness.Missing(t, "%s not found", tool)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		harness.Missing(t, "the CNI plugins (/usr/lib/cni/bridge) are not installed")
	}

	id := make([]byte, 2)
	_, _ = rand.Read(id)
	tag := hex.EncodeToString(id)
	// 10.89.X.0/24 for the nodes, 10.(90+i).X.0/24 for node i's pods.
	third := int(id[0])
	c := &kubeCluster{kubectl: bins["kubectl"], gw: fmt.Sprintf("10.89.%d.1", third)}
	bridge := "bk" + tag
	sh(t, "ip", "link", "add", bridge, "type", "bridge")
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", bridge).Run() })
	sh(t, "ip", "addr", "add", c.gw+"/24", "dev", bridge)
	sh(t, "ip", "link", "set", bridge, "up")

	c.api = startAPIServerOn(t, c.gw)
	c.env = c.api.env()
	dir := c.api.dir
	daemon(t, dir, "kube-controller-manager", bins["kube-controller-manager"],
		"--kubeconfig="+c.api.kubeconfig, "--leader-elect=false", "--secure-port=0",
		"--service-account-private-key-file="+c.api.saKey, "--root-ca-file="+filepath.Join(dir, "tls.crt"),
		"--use-service-account-credentials=false", "--controllers=*", "--v=0")
	daemon(t, dir, "kube-scheduler", bins["kube-scheduler"],
		"--kubeconfig="+c.api.kubeconfig, "--leader-elect=false", "--secure-port=0", "--v=0")
	corefile := filepath.Join(dir, "Corefile")
	writeFile(t, corefile, fmt.Sprintf(`.:53 {
    bind %s
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %s test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
}
`, c.gw, c.api.kubeconfig))
	daemon(t, dir, "coredns", bins["coredns"], "-conf", corefile)

	for i := 1; i <= n; i++ {
		node := &kubeNode{
			name:    fmt.Sprintf("node%d", i),
			ip:      fmt.Sprintf("10.89.%d.%d", third, 10+i),
			podCIDR: fmt.Sprintf("10.%d.%d.0/24", 90+i, third),
			netns:   fmt.Sprintf("shk%s-%d", tag, i),
			dir:     filepath.Join(t.TempDir(), "node"),
			cgroup:  fmt.Sprintf("shoalk%s-%d", tag, i),
			pause:   pause,
		}
		c.nodes = append(c.nodes, node)
		c.addNetwork(t, node, bridge)
	}
	for _, a := range c.nodes {
		for _, b := range c.nodes {
			if a != b {
				sh(t, "ip", "-n", a.netns, "route", "add", b.podCIDR, "via", b.ip)
			}
		}
		sh(t, "ip", "route", "add", a.podCIDR, "via", a.ip)
		route := a.podCIDR
		t.Cleanup(func() { _ = exec.Command("ip", "route", "del", route).Run() })
	}
	for _, node := range c.nodes {
		c.startNode(t, node, bins, images)
	}
	c.kc(t, "wait", "--for=condition=Ready", "node", "--all", "--timeout=120s")
	return c
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// kc runs kubectl against the cluster and returns its output.
func (c *kubeCluster) kc(t *testing.T, args ...string) string {
	t.Helper()
	out, err := run(t, c.env, c.kubectl, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// addNetwork gives node a network namespace on the bridge, with a default
// route through the test's namespace and forwarding on (for its pods).
func (c *kubeCluster) addNetwork(t *testing.T, node *kubeNode, bridge string) {
	t.Helper()
	sh(t, "ip", "netns", "add", node.netns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", node.netns).Run() })
	veth := "v" + node.netns
	sh(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
	sh(t, "ip", "link", "set", veth, "master", bridge, "up")
	sh(t, "ip", "-n", node.netns, "addr", "add", node.ip+"/24", "dev", "eth0")
	sh(t, "ip", "-n", node.netns, "link", "set", "eth0", "up")
	sh(t, "ip", "-n", node.netns, "link", "set", "lo", "up")
	sh(t, "ip", "-n", node.netns, "route", "add", "default", "via", c.gw)
	sh(t, "ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
}

// startNode makes node's mount namespace and cgroup, writes its containerd,
// CNI, kubelet and kube-proxy configuration, and starts the three daemons.
func (c *kubeCluster) startNode(t *testing.T, node *kubeNode, bins map[string]string, images []string) {
	t.Helper()
	// Everything the node starts, containers and containerd's shims included,
	// runs in its cgroup; the last cleanup kills what is left there and
	// removes the node's mounts and cgroups.
	for _, ctl := range cgroupControllers {
		root := filepath.Join("/sys/fs/cgroup", ctl)
		if err := os.MkdirAll(filepath.Join(root, node.cgroup, "system"), 0o755); err != nil {
			t.Fatalf("cgroup %s: %v", ctl, err)
		}
		if ctl == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, _ := os.ReadFile(filepath.Join(root, f))
				for _, d := range []string{node.cgroup, node.cgroup + "/system"} {
					_ = os.WriteFile(filepath.Join(root, d, f), v, 0o644)
				}
			}
		}
	}
	// The mount points: the test's own mount namespace sees them empty.
	// Those this test made (and their new parents) go once the nodes are gone.
	for _, b := range nodeBinds {
		var made []string
		for d := b; d != "/"; d = filepath.Dir(d) {
			if _, err := os.Stat(d); !os.IsNotExist(err) {
				break
			}
			made = append(made, d)
		}
		t.Cleanup(func() {
			for _, d := range made {
				_ = os.Remove(d)
			}
		})
	}
	t.Cleanup(func() { node.teardown(t) })

	for _, b := range nodeBinds {
		if err := os.MkdirAll(b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(node.host(b), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	nsdir := filepath.Join(node.dir, "ns")
	if err := os.MkdirAll(nsdir, 0o755); err != nil {
		t.Fatal(err)
	}
	sh(t, "mount", "--bind", nsdir, nsdir)
	sh(t, "mount", "--make-private", nsdir)
	node.mntns = filepath.Join(nsdir, "mnt")
	writeFile(t, node.mntns, "")
	script := "set -e\n"
	for _, b := range nodeBinds {
		script += fmt.Sprintf("mount --bind %q %q\n", node.host(b), b)
	}
	sh(t, "unshare", "--mount="+node.mntns, "--propagation", "private", "sh", "-c", script)

	writeFile(t, node.host("/etc/containerd/config.toml"), fmt.Sprintf(`version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %q
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "/etc/containerd/certs.d"
[plugins.'io.containerd.cri.v1.runtime']
  # This machine withholds CAP_SYS_RESOURCE even from root, so no process
  # may lower its oom_score_adj: kubelet's -998 for sandboxes would fail.
  restrict_oom_score_adj = true
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    SystemdCgroup = false
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "/etc/cni/net.d"
`, node.pause))
	writeFile(t, node.host("/etc/cni/net.d/10-shoalk.conflist"), fmt.Sprintf(`{
  "cniVersion": "1.0.0", "name": "shoalk",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
`, node.podCIDR))

	path := filepath.Dir(bins["containerd-shim-runc-v2"]) + ":" + os.Getenv("PATH")
	node.daemon(t, "containerd", []string{"PATH=" + path}, bins["containerd"], "--config", "/etc/containerd/config.toml")
	sock := node.host("/run/containerd/containerd.sock")
	harness.Eventually(t, 30*time.Second, node.name+": containerd answers", func() error {
		return exec.Command(bins["ctr"], "--address", sock, "version").Run()
	})
	for _, img := range images {
		out, err := exec.Command(bins["ctr"], "--address", sock, "-n", "k8s.io", "images", "import", "--platform", "linux/amd64", img).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: import %s: %v\n%s", node.name, img, err, out)
		}
	}

	kubeconfig := node.host("/var/lib/kubelet/kubeconfig")
	b, err := os.ReadFile(c.api.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, kubeconfig, string(b))
	kcfg := map[string]any{
		"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
		// This machine has cgroup v1 (hybrid); kubelet 1.35 refuses it unless told.
		"failCgroupV1": false, "cgroupDriver": "cgroupfs", "cgroupRoot": "/" + node.cgroup,
		"containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
		"authentication":           map[string]any{"anonymous": map[string]any{"enabled": true}, "webhook": map[string]any{"enabled": false}},
		"authorization":            map[string]any{"mode": "AlwaysAllow"},
		"address":                  node.ip, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
		"clusterDNS": []string{c.gw}, "clusterDomain": "cluster.local",
		"failSwapOn": false, "serializeImagePulls": false,
		"evictionHard":                map[string]string{"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
		"imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
		"podLogsDir": "/var/log/pods", "resolvConf": "/etc/resolv.conf",
	}
	kb, _ := yaml.Marshal(kcfg)
	writeFile(t, node.host("/var/lib/kubelet/config.yaml"), string(kb))
	node.daemon(t, "kubelet", nil, bins["kubelet"],
		"--config=/var/lib/kubelet/config.yaml", "--kubeconfig=/var/lib/kubelet/kubeconfig",
		"--root-dir=/var/lib/kubelet", "--hostname-override="+node.name, "--node-ip="+node.ip, "--v=1")
	node.daemon(t, "kube-proxy", nil, bins["kube-proxy"],
		"--kubeconfig=/var/lib/kubelet/kubeconfig", "--hostname-override="+node.name,
		"--proxy-mode=iptables", "--cluster-cidr=10.0.0.0/8",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256",
		"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0", "--v=0")
}

// daemon runs bin in node's namespaces and cgroup until the end of the test.
func (n *kubeNode) daemon(t *testing.T, name string, env []string, bin string, args ...string) {
	t.Helper()
	// The shell joins the node's cgroup, then execs into its namespaces.
	script := fmt.Sprintf(`for c in %s; do echo $$ > /sys/fs/cgroup/$c/%s/system/cgroup.procs; done; exec nsenter --mount=%s --net=/run/netns/%s -- "$@"`,
		strings.Join(cgroupControllers, " "), n.cgroup, n.mntns, n.netns)
	cmd := exec.Command("sh", append([]string{"-c", script, "sh", bin}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	logf, err := os.Create(filepath.Join(n.dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("%s %s log tail:\n%s", n.name, name, tail(string(b), 3000))
		}
		logf.Close()
	})
	if _, err := harness.Spawn(t, cmd, os.Interrupt, 10*time.Second); err != nil {
		t.Fatalf("%s: start %s: %v", n.name, name, err)
	}
}

// teardown kills every process left in the node's cgroup (containers,
// containerd's shims), then removes its mount namespace and cgroups.
func (n *kubeNode) teardown(t *testing.T) {
	pids := filepath.Join("/sys/fs/cgroup/pids", n.cgroup)
	for try := 0; ; try++ {
		var left []string
		_ = filepath.WalkDir(pids, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Name() == "cgroup.procs" {
				b, _ := os.ReadFile(p)
				left = append(left, strings.Fields(string(b))...)
			}
			return nil
		})
		if len(left) == 0 {
			break
		}
		if try == 100 {
			t.Errorf("%s: processes left in its cgroup: %v", n.name, left)
			break
		}
		for _, p := range left {
			if pid, err := strconv.Atoi(p); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n.mntns != "" {
		_ = exec.Command("umount", n.mntns).Run()
		_ = exec.Command("umount", filepath.Dir(n.mntns)).Run()
	}
	for _, ctl := range cgroupControllers {
		root := filepath.Join("/sys/fs/cgroup", ctl, n.cgroup)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.Remove(dirs[i])
		}
	}
}

// nodeMetric reads one metric from the shoal node on node (hostNetwork, so
// on the node's address), summed over the series matching labels.
func (c *kubeCluster) nodeMetric(t *testing.T, node *kubeNode, name string, labels ...string) float64 {
	t.Helper()
	body := get(t, "http://"+node.ip+":9090/metrics", 200)
	v, err := harness.SumMetric(string(body), name, labels...)
	if err != nil {
		t.Fatalf("%s: %s: %v", node.name, name, err)
	}
	return v
}

// nodeMetrics is the shoal node's own series on node (shoal_node_*), for
// failure messages.
func (c *kubeCluster) nodeMetrics(t *testing.T, node *kubeNode) string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(string(get(t, "http://"+node.ip+":9090/metrics", 200)), "\n") {
		if strings.HasPrefix(l, "shoal_node_") && !strings.HasSuffix(l, " 0") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// dockerConfig is a kubernetes.io/dockerconfigjson payload for one registry.
func dockerConfig(registry, user, pass string) string {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	return fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, registry, auth)
}
