package harness

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// S3 is a private SeaweedFS server (`weed server` with its filer and S3
// gateway) owned by one test: a real S3-compatible object store on
// loopback, with one admin identity and one bucket for the cache tier.
type S3 struct {
	Endpoint  string // http://127.0.0.1:P, the S3 gateway
	Bucket    string
	Region    string
	AccessKey string
	SecretKey string

	bin  string
	dir  string
	args []string
	child
}

// StartS3 starts SeaweedFS (SHOAL_WEED_BIN, else weed on PATH) with its data
// in a temporary directory, waits until the S3 gateway answers and a volume
// server has joined, and kills it in t.Cleanup. Telemetry is off: nothing
// leaves loopback.
func StartS3(t testing.TB) *S3 {
	t.Helper()
	s := &S3{bin: Binary(t, "SHOAL_WEED_BIN", "weed"), dir: t.TempDir(), Bucket: "shoal", Region: "us-east-1",
		AccessKey: "shoal" + randHex(t, 4), SecretKey: randHex(t, 16)}
	cfg := map[string]any{"identities": []map[string]any{{
		"name":        "shoal",
		"credentials": []map[string]string{{"accessKey": s.AccessKey, "secretKey": s.SecretKey}},
		"actions":     []string{"Admin", "Read", "Write", "List", "Tagging"},
	}}}
	b, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(s.dir, "s3.json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	port := func() string { return strconv.Itoa(FreePort(t)) }
	master, masterGRPC, s3port := port(), port(), port()
	s.Endpoint = "http://127.0.0.1:" + s3port
	data := filepath.Join(s.dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	s.args = []string{"server", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-master.port=" + master, "-master.port.grpc=" + masterGRPC, "-master.telemetry=false",
		"-master.volumeSizeLimitMB=256", "-volume.max=0",
		"-volume.port=" + port(), "-volume.port.grpc=" + port(),
		"-filer", "-filer.port=" + port(), "-filer.port.grpc=" + port(),
		"-s3", "-s3.port=" + s3port, "-s3.port.grpc=" + port(), "-s3.config=" + cfgPath,
		"-s3.port.iceberg=0", "-s3.port.lance=0",
	}
	t.Cleanup(s.Kill)
	s.start(t)
	// A volume server has joined once the master can assign a file id.
	Eventually(t, 60*time.Second, "SeaweedFS volume server", func() error {
		resp, err := http.Get("http://127.0.0.1:" + master + "/dir/assign")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/dir/assign: %s", resp.Status)
		}
		return nil
	})
	// The bucket, made the way an operator would, through weed shell.
	Eventually(t, 60*time.Second, "SeaweedFS bucket "+s.Bucket, func() error {
		sh := exec.Command(s.bin, "shell", "-master=127.0.0.1:"+master+"."+masterGRPC) // host:http.grpc
		sh.Dir = s.dir
		sh.Stdin = strings.NewReader("s3.bucket.create -name " + s.Bucket + "\nexit\n")
		out, err := sh.CombinedOutput()
		if err != nil {
			return fmt.Errorf("weed shell: %w\n%s", err, out)
		}
		ls := exec.Command(s.bin, "shell", "-master=127.0.0.1:"+master+"."+masterGRPC) // host:http.grpc
		ls.Dir = s.dir
		ls.Stdin = strings.NewReader("s3.bucket.list\nexit\n")
		out, err = ls.CombinedOutput()
		if err != nil || !strings.Contains(string(out), s.Bucket) {
			return fmt.Errorf("bucket %s not listed: %v\n%s", s.Bucket, err, out)
		}
		return nil
	})
	return s
}

func randHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func (s *S3) start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(s.dir, "weed.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(s.bin, s.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = s.dir
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start weed: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	s.set(cmd, done)
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		// Any HTTP answer (403 to an anonymous ListBuckets) means the
		// gateway is up.
		if resp, err := client.Get(s.Endpoint + "/"); err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("weed exited early\n%s", s.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("weed S3 gateway on %s not up after 60s\n%s", s.Endpoint, s.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Log is the server's log so far.
func (s *S3) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "weed.log"))
	return string(b)
}

// CacheArgs are the `shoal cache` flags that store in this bucket. The
// credentials are not among them: pass CacheEnv, so they stay out of argv.
func (s *S3) CacheArgs() []string {
	return []string{"--storage", "s3",
		"--storage-opt", "bucket=" + s.Bucket,
		"--storage-opt", "region=" + s.Region,
		"--storage-opt", "regionendpoint=" + s.Endpoint,
		"--storage-opt", "forcepathstyle=true",
		"--storage-opt", "rootdirectory=/registry",
	}
}

// CacheEnv is the environment that gives `shoal cache` the credentials.
func (s *S3) CacheEnv() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey}
}
