package chart

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/shoal-oci/shoal/test/harness"
)

// apiServer is a real etcd + kube-apiserver, with no scheduler or kubelet
// of its own: objects are validated and stored; pods run only where a
// kubeCluster adds nodes.
type apiServer struct {
	kubeconfig string
	dir        string
	saKey      string // the service-account signing key (PEM file)
}

func (a *apiServer) env() []string {
	return []string{"KUBECONFIG=" + a.kubeconfig, "HELM_CACHE_HOME=" + filepath.Join(a.dir, "helm-cache"), "HELM_CONFIG_HOME=" + filepath.Join(a.dir, "helm-config"), "HELM_DATA_HOME=" + filepath.Join(a.dir, "helm-data")}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// startAPIServer starts etcd and kube-apiserver in temp dirs on random
// loopback ports, with a self-signed serving certificate, a service-account
// signing key and a static admin token, and stops them in t.Cleanup.
func startAPIServer(t *testing.T) *apiServer {
	t.Helper()
	return startAPIServerOn(t, "127.0.0.1")
}

// startAPIServerOn is startAPIServer with kube-apiserver serving on ip (etcd
// stays on loopback), for kubelets in other network namespaces.
func startAPIServerOn(t *testing.T, ip string) *apiServer {
	t.Helper()
	etcdBin := harness.Binary(t, "SHOAL_ETCD_BIN", "etcd")
	apiBin := harness.Binary(t, "SHOAL_KUBE_APISERVER_BIN", "kube-apiserver")
	dir := t.TempDir()

	// Serving certificate for 127.0.0.1, self-signed (it is its own CA).
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true,
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(ip), net.ParseIP("10.96.0.1")},
		DNSNames:    []string{"localhost", "kubernetes.default.svc.cluster.local"},
	}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	writePEM(t, filepath.Join(dir, "tls.crt"), "CERTIFICATE", certDER)
	writePEM(t, filepath.Join(dir, "tls.key"), "EC PRIVATE KEY", keyDER)
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey))
	saPub, _ := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	writePEM(t, filepath.Join(dir, "sa.pub"), "PUBLIC KEY", saPub)
	token := fmt.Sprintf("%x", certDER[len(certDER)-16:])
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	clientPort, peerPort, apiPort := harness.FreePort(t), harness.FreePort(t), harness.FreePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	daemon(t, dir, "etcd", etcdBin,
		"--name=shoal-test", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=shoal-test="+peerURL, "--unsafe-no-fsync", "--log-level=warn")
	daemon(t, dir, "kube-apiserver", apiBin,
		"--etcd-servers="+etcdURL,
		"--bind-address="+ip, "--advertise-address="+ip, fmt.Sprintf("--secure-port=%d", apiPort),
		"--tls-cert-file="+filepath.Join(dir, "tls.crt"), "--tls-private-key-file="+filepath.Join(dir, "tls.key"),
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"), "--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
		"--kubelet-preferred-address-types=InternalIP", "--v=0")

	server := fmt.Sprintf("https://%s:%d", ip, apiPort)
	kc := map[string]any{
		"apiVersion": "v1", "kind": "Config", "current-context": "test",
		"clusters": []any{map[string]any{"name": "test", "cluster": map[string]any{
			"server": server, "certificate-authority-data": base64.StdEncoding.EncodeToString(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}))}}},
		"users":    []any{map[string]any{"name": "admin", "user": map[string]any{"token": token}}},
		"contexts": []any{map[string]any{"name": "test", "context": map[string]any{"cluster": "test", "user": "admin"}}},
	}
	b, _ := yaml.Marshal(kc)
	a := &apiServer{kubeconfig: filepath.Join(dir, "kubeconfig"), dir: dir, saKey: filepath.Join(dir, "sa.key")}
	if err := os.WriteFile(a.kubeconfig, b, 0o600); err != nil {
		t.Fatal(err)
	}

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}))
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	deadline := time.Now().Add(60 * time.Second)
	for {
		req, _ := http.NewRequest(http.MethodGet, server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready after 60s: %v", err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	return a
}

// daemon runs a long-lived process until the end of the test, killing it in
// Cleanup and showing its log tail if the test failed.
func daemon(t *testing.T, dir, name, bin string, args ...string) {
	t.Helper()
	logf, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Registered first, so that it runs after the process has stopped.
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("%s log tail:\n%s", name, tail(string(b), 2000))
		}
		logf.Close()
	})
	if _, err := harness.Spawn(t, cmd, os.Interrupt, 5*time.Second); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
}

// serviceMonitorCRD is a minimal CRD for monitoring.coreos.com/v1
// ServiceMonitor, enough for the API server to accept the chart's object.
const serviceMonitorCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              x-kubernetes-preserve-unknown-fields: true
`

// TestInstallUpgradeOnAPIServer installs and upgrades the chart for every
// matrix case against a real API server, each in its own namespace.
func TestInstallUpgradeOnAPIServer(t *testing.T) {
	helm := helmBin(t)
	kubectl := harness.Binary(t, "SHOAL_KUBECTL_BIN", "kubectl")
	a := startAPIServer(t)
	env := a.env()
	kc := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := run(t, env, kubectl, args...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	crd := filepath.Join(a.dir, "crd.yaml")
	if err := os.WriteFile(crd, []byte(serviceMonitorCRD), 0o644); err != nil {
		t.Fatal(err)
	}
	kc(t, "apply", "-f", crd)
	kc(t, "wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com", "--timeout=30s")

	types := strings.Join([]string{"secrets", "configmaps", "services", "serviceaccounts", "daemonsets.apps", "deployments.apps",
		"persistentvolumeclaims", "poddisruptionbudgets.policy", "networkpolicies.networking.k8s.io",
		"servicemonitors.monitoring.coreos.com"}, ",")

	for _, c := range matrix {
		t.Run(c.name, func(t *testing.T) {
			ns := "shoal-" + c.name
			if c.name == "existing-secret" {
				kc(t, "create", "namespace", ns)
				kc(t, "-n", ns, "create", "secret", "docker-registry", "regcred",
					"--docker-server=ghcr.io", "--docker-username=shoal-test-user", "--docker-password="+credMarker)
			}
			if c.name == "external-redis" {
				kc(t, "create", "namespace", ns)
				kc(t, "-n", ns, "create", "secret", "generic", "shoal-s3", "--from-literal=AWS_ACCESS_KEY_ID=x")
			}
			install := append([]string{"install", "rel", chartDir, "-n", ns, "--create-namespace", "--timeout=60s"}, c.helmArgs()...)
			if _, err := run(t, env, helm, install...); err != nil {
				t.Fatalf("helm install: %v", err)
			}
			// Every object passes strict server-side validation.
			manifest, err := run(t, env, helm, "get", "manifest", "rel", "-n", ns)
			if err != nil {
				t.Fatal(err)
			}
			mf := filepath.Join(t.TempDir(), "manifest.yaml")
			if err := os.WriteFile(mf, []byte(manifest), 0o600); err != nil {
				t.Fatal(err)
			}
			kc(t, "apply", "-n", ns, "--dry-run=server", "--validate=strict", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", mf)

			psk := secretData(t, env, kubectl, ns, "rel-shoal-psk", "swarm.key")
			tok := secretData(t, env, kubectl, ns, "rel-shoal-cache-token", "token")
			if c.name != "psk-off" && !strings.HasPrefix(psk, "/key/swarm/psk/1.0.0/\n/base16/\n") {
				t.Errorf("PSK Secret holds %q, not a swarm.key", psk)
			}
			upgrade := append([]string{"upgrade", "rel", chartDir, "-n", ns, "--timeout=60s", "--set", "logLevel=debug"}, c.helmArgs()...)
			if _, err := run(t, env, helm, upgrade...); err != nil {
				t.Fatalf("helm upgrade: %v", err)
			}
			if got := secretData(t, env, kubectl, ns, "rel-shoal-psk", "swarm.key"); got != psk {
				t.Errorf("PSK changed across upgrade")
			}
			if got := secretData(t, env, kubectl, ns, "rel-shoal-cache-token", "token"); got != tok || tok == "" {
				t.Errorf("cache token changed across upgrade (or is empty)")
			}
			ds := kc(t, "-n", ns, "get", "daemonset", "rel-shoal-node", "-o", "jsonpath={.spec.template.spec.containers[0].args}")
			if !strings.Contains(ds, "--log-level=debug") {
				t.Errorf("upgrade did not reach the DaemonSet: %s", ds)
			}
			if c.name == "psk-off" && psk != "" {
				t.Errorf("PSK Secret exists while disabled")
			}

			// The credentials appear in exactly one object: the credentials Secret.
			dump := kc(t, "-n", ns, "get", types, "-o", "yaml")
			var list struct {
				Items []map[string]any `yaml:"items"`
			}
			if err := yaml.Unmarshal([]byte(dump), &list); err != nil {
				t.Fatal(err)
			}
			wantHolder := "rel-shoal-credentials"
			if c.name == "existing-secret" {
				wantHolder = "regcred"
			}
			var holders []string
			for _, it := range list.Items {
				o := object(it)
				if holdsCredentials(t, o) {
					holders = append(holders, o.kind()+"/"+o.name())
				}
			}
			if c.credentials || c.name == "existing-secret" {
				if len(holders) != 1 || holders[0] != "Secret/"+wantHolder {
					t.Errorf("credentials found in %v, want only Secret/%s", holders, wantHolder)
				}
			} else if len(holders) != 0 {
				t.Errorf("credentials found in %v without any configured", holders)
			}
			if strings.Contains(dump, redisMarker) {
				t.Errorf("the external Redis password is stored in clear text")
			}
		})
	}
}

// secretData returns one decoded key of a Secret, or "" if it does not exist.
func secretData(t *testing.T, env []string, kubectl, ns, name, key string) string {
	t.Helper()
	out, err := run(t, env, kubectl, "-n", ns, "get", "secret", name, "--ignore-not-found", "-o", "jsonpath={.data."+strings.ReplaceAll(key, ".", `\.`)+"}")
	if err != nil {
		t.Fatal(err)
	}
	if out == "" {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(out)
	if err != nil {
		t.Fatalf("secret %s/%s: %v", name, key, err)
	}
	return string(b)
}

// holdsCredentials reports whether an object carries the test credentials,
// in clear text or in a base64 Secret/ConfigMap value.
func holdsCredentials(t *testing.T, o object) bool {
	t.Helper()
	b, err := yaml.Marshal(map[string]any(o))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if strings.Contains(text, credMarker) || strings.Contains(text, credB64) {
		return true
	}
	for _, field := range []string{"data", "binaryData"} {
		m, _ := o[field].(map[string]any)
		for _, v := range m {
			s, _ := v.(string)
			dec, err := base64.StdEncoding.DecodeString(s)
			if err == nil && (strings.Contains(string(dec), credMarker) || strings.Contains(string(dec), credB64)) {
				return true
			}
		}
	}
	return false
}
