package main

import (
	"bytes"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestFlagsReadEnvTwins(t *testing.T) {
	t.Setenv("SHOAL_CACHE_URL", "http://from-env:5000")
	t.Setenv("SHOAL_PROVIDER_TTL", "7s")
	t.Setenv("SHOAL_BOOTSTRAP_PEERS", "a:1,b:2")
	f := newFlags("node", "", io.Discard)
	cacheURL := f.String("cache-url", "", "")
	ttl := f.Duration("provider-ttl", time.Minute, "")
	zone := f.String("zone", "", "")
	var peers listFlag
	f.Var(&peers, "bootstrap-peers", "")
	if err := f.parse([]string{"--zone", "eu-1a", "--cache-url", "http://from-flag:5000"}); err != nil {
		t.Fatal(err)
	}
	if *cacheURL != "http://from-flag:5000" {
		t.Errorf("a flag must win over its env twin: %q", *cacheURL)
	}
	if *ttl != 7*time.Second || *zone != "eu-1a" || strings.Join(peers, " ") != "a:1 b:2" {
		t.Errorf("ttl %v zone %q peers %v", *ttl, *zone, peers)
	}
}

func TestBadEnvTwinIsAnError(t *testing.T) {
	t.Setenv("SHOAL_PROVIDER_TTL", "soon")
	f := newFlags("node", "", io.Discard)
	f.Duration("provider-ttl", time.Minute, "")
	if err := f.parse(nil); err == nil || !strings.Contains(err.Error(), "SHOAL_PROVIDER_TTL") {
		t.Fatalf("err = %v", err)
	}
}

func TestHelpNamesEveryEnvTwin(t *testing.T) {
	for _, cmd := range []string{"node", "cache", "configure"} {
		var out bytes.Buffer
		err := run([]string{cmd, "--help"}, &out, &out)
		if err == nil {
			t.Fatalf("%s --help: want flag.ErrHelp", cmd)
		}
		for _, line := range strings.Split(out.String(), "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, "--") {
				continue
			}
			name := strings.Fields(line)[0][2:]
			if !strings.Contains(line, "["+envName(name)+"]") {
				t.Errorf("%s: %q does not name its env twin", cmd, line)
			}
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1024": 1024, "512MiB": 512 << 20, "50GiB": 50 << 30, "1.5GB": 1_500_000_000, "10 KiB": 10 << 10} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "lots", "1XB"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestUnknownCommand(t *testing.T) {
	var out bytes.Buffer
	if err := run([]string{"serve"}, &out, &out); err == nil {
		t.Fatal("unknown command accepted")
	}
	out.Reset()
	if err := run([]string{"version"}, &out, &out); err != nil || !strings.HasPrefix(out.String(), "shoal ") {
		t.Fatalf("version: %v %q", err, out.String())
	}
}

func TestCacheTransportTrustsTheGivenCAAndSendsTheToken(t *testing.T) {
	var gotAuth atomic.Value
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth.Store(r.Header.Get("Authorization"))
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("node-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	rt, err := cacheTransport(ca, tok)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: rt}).Get(srv.URL + "/v2/")
	if err != nil {
		t.Fatalf("https with the given CA: %v", err)
	}
	resp.Body.Close()
	if got, _ := gotAuth.Load().(string); got != "Bearer node-token" {
		t.Fatalf("Authorization = %q", got)
	}

	// Without the CA the same server is not trusted.
	rt, err = cacheTransport("", tok)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (&http.Client{Transport: rt}).Get(srv.URL + "/v2/"); err == nil {
		t.Fatal("a server signed by an unknown CA was trusted")
	}
	if _, err := cacheTransport(tok, ""); err == nil {
		t.Fatal("a file with no PEM certificates was accepted as a CA bundle")
	}
	if rt, err := cacheTransport("", ""); rt != nil || err != nil {
		t.Fatalf("no CA and no token: want the node's default transport, got %v %v", rt, err)
	}
}

// A panic in a handler is logged at error level with its stack, counted,
// and answered with an OCI 500; one after the response started cuts the
// connection instead of completing a broken body; http.ErrAbortHandler, the
// deliberate way to cut a response, is neither logged nor counted.
func TestRecoverPanics(t *testing.T) {
	logs := &lockedBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, nil))
	panics := prometheus.NewCounter(prometheus.CounterOpts{Name: "p"})
	h := recoverPanics(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/before":
			var m map[string]int
			m["boom"]++ // a nil-map write: a real runtime panic
		case "/after":
			w.Header().Set("Content-Length", "100")
			w.WriteHeader(200)
			_, _ = w.Write([]byte("partial"))
			w.(http.Flusher).Flush() // the client has the headers now
			panic("mid-body")
		case "/abort":
			panic(http.ErrAbortHandler)
		}
	}), log, panics)
	srv := httptest.NewServer(h)
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/before")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 500 || !strings.Contains(string(body), `"UNAVAILABLE"`) {
		t.Fatalf("panic before the response: %d %s; want an OCI 500", resp.StatusCode, body)
	}
	resp, err = http.Get(srv.URL + "/after")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("a panic mid-body was delivered as a complete response")
	}
	if resp, err := http.Get(srv.URL + "/abort"); err == nil {
		resp.Body.Close()
	}
	if got := testutil.ToFloat64(panics); got != 2 {
		t.Fatalf("panics counted = %v, want 2 (ErrAbortHandler is not one)\n%s", got, logs.String())
	}
	var errorLines int
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if strings.Contains(line, `"level":"ERROR"`) && strings.Contains(line, "panic serving request") && strings.Contains(line, `"stack"`) {
			errorLines++
		}
	}
	if errorLines != 2 {
		t.Fatalf("%d error lines with a stack, want 2:\n%s", errorLines, logs.String())
	}
}

// lockedBuffer is a bytes.Buffer safe for a server's goroutines and a test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
