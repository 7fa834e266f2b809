// Command shoal is a cluster-local container image mirror in two tiers:
// `shoal node` runs beside containerd on every node and serves what the
// node and its peers already hold; `shoal cache` is the shared pull-through
// cache that talks to the upstream registries. `shoal configure` points
// containerd at the node through hosts.toml files.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shoal-oci/shoal/auth"
	"github.com/shoal-oci/shoal/node"
	"github.com/shoal-oci/shoal/node/mirror"
	"github.com/shoal-oci/shoal/node/routing/dht"
	ctrdstore "github.com/shoal-oci/shoal/node/store/containerd"
	"github.com/shoal-oci/shoal/node/store/layout"
	"github.com/shoal-oci/shoal/oci"
)

// nodeGCPercent is the node's garbage-collection target unless GOGC is set.
const nodeGCPercent = 25

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "shoal:", err)
		}
		os.Exit(2)
	}
}

const topUsage = `shoal: a cluster-local container image mirror.

Usage:
  shoal node       run the per-node mirror beside containerd
  shoal cache      run the shared pull-through cache
  shoal configure  write (or --remove) containerd hosts.toml mirror files
  shoal version    print the version

Every flag has a SHOAL_* environment twin: --registry-addr is SHOAL_REGISTRY_ADDR.
Run "shoal <command> --help" for a command's flags.
`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "node":
		return runNode(args[1:], stderr)
	case "cache":
		return runCache(args[1:], stderr)
	case "configure":
		return runConfigure(args[1:], stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "shoal", buildVersion())
		return nil
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, topUsage)
		return nil
	}
	fmt.Fprint(stderr, topUsage)
	return fmt.Errorf("unknown command %q", args[0])
}

func buildVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

// flags is a flag.FlagSet whose every flag also reads SHOAL_<NAME> from the
// environment; a flag on the command line wins over its env twin.
type flags struct {
	*flag.FlagSet
}

func newFlags(name, summary string, stderr io.Writer) *flags {
	fs := flag.NewFlagSet("shoal "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &flags{fs}
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: shoal %s [flags]\n\n%s\n\nFlags (each with its SHOAL_* environment twin):\n", name, summary)
		fs.VisitAll(func(fl *flag.Flag) {
			def := ""
			if fl.DefValue != "" && fl.DefValue != "[]" {
				def = fmt.Sprintf(" (default %s)", fl.DefValue)
			}
			fmt.Fprintf(stderr, "  --%s  [%s]%s\n      %s\n", fl.Name, envName(fl.Name), def, fl.Usage)
		})
	}
	return f
}

func envName(flagName string) string {
	return "SHOAL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// daemonFlags defines the flags every long-running command shares.
func (f *flags) daemonFlags() (grace *time.Duration, logLevel, pprofAddr, addrFile *string) {
	return f.Duration("shutdown-grace", 30*time.Second, "how long in-flight responses may take to finish on shutdown"),
		f.String("log-level", "info", "debug, info, warn or error"),
		f.String("pprof-addr", "", "address for Go's /debug/pprof profiles (heap, CPU, goroutines); empty disables. Keep it on loopback: profiles show memory contents"),
		f.String("addr-file", "", "once every port is open, write the addresses bound (JSON) to this file, for tools that start the daemon with port 0 in its addresses (host:0)")
}

// parse applies environment twins, then the command line.
func (f *flags) parse(args []string) error {
	var err error
	f.VisitAll(func(fl *flag.Flag) {
		if v, ok := os.LookupEnv(envName(fl.Name)); ok && err == nil {
			if e := f.Set(fl.Name, v); e != nil {
				err = fmt.Errorf("%s: %w", envName(fl.Name), e)
			}
		}
	})
	if err != nil {
		return err
	}
	if err := f.Parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", f.Args())
	}
	return nil
}

// listFlag is a repeatable flag; one value may also hold a comma-separated list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lv})), nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

// newRegistry returns a fresh Prometheus registry with the Go and process collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// opsHandler serves /metrics, /healthz and /readyz.
func opsHandler(reg *prometheus.Registry, ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	return mux
}

// withOps adds /healthz and /readyz to a handler, so probes can use the main port too.
func withOps(h http.Handler, ops http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz", "/readyz":
			ops.ServeHTTP(w, r)
		default:
			h.ServeHTTP(w, r)
		}
	})
}

// listener is one more HTTP server a daemon runs beside its main one, on a
// port it has already bound; name is its key in the --addr-file.
type listener struct {
	name string
	ln   net.Listener
	h    http.Handler
}

// bind listens on addr for the flag named name; a port of 0 picks a free one.
func bind(name, addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--%s %s: %w", name, addr, err)
	}
	return ln, nil
}

// boundPort is the port ln bound, as a string.
func boundPort(ln net.Listener) string { return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port) }

// boundAddr is addr (a flag's host:port) with the port ln bound, so ":0"
// becomes ":41234" and a host given stays as given.
func boundAddr(addr string, ln net.Listener) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return ln.Addr().String()
	}
	return net.JoinHostPort(host, boundPort(ln))
}

// writeAddrFile writes addrs as JSON to path, atomically (a temporary file
// renamed into place), so a reader sees all of it or nothing.
func writeAddrFile(path string, addrs map[string]any) error {
	b, err := json.MarshalIndent(addrs, "", "  ")
	if err != nil {
		return fmt.Errorf("--addr-file: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("--addr-file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("--addr-file: %w", err)
	}
	return nil
}

// recoverPanics turns a panic in h into an error log line, a count and a
// 500 (when nothing was written yet). http.ErrAbortHandler, the deliberate
// way to cut a response short, passes through untouched.
func recoverPanics(h http.Handler, log *slog.Logger, panics prometheus.Counter) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &startWriter{ResponseWriter: w}
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			panics.Inc()
			log.ErrorContext(r.Context(), "panic serving request", "method", r.Method, "path", r.URL.Path,
				"panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if sw.started {
				panic(http.ErrAbortHandler) // cut the response: never a complete-looking body
			}
			oci.WriteError(w, r, oci.Errorf(http.StatusInternalServerError, oci.CodeUnavailable, "internal error"))
		}()
		h.ServeHTTP(sw, r)
	})
}

// startWriter records whether a response has started. It keeps the
// underlying writer's ReadFrom (sendfile, splice) and Flush.
type startWriter struct {
	http.ResponseWriter
	started bool
}

func (w *startWriter) WriteHeader(code int) {
	if code >= 200 {
		w.started = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *startWriter) Write(p []byte) (int, error) {
	w.started = true
	return w.ResponseWriter.Write(p)
}

// ReadFrom lets io.Copy reach the server's own ReadFrom (sendfile, splice).
func (w *startWriter) ReadFrom(r io.Reader) (int64, error) {
	w.started = true
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
}

// Flush implements http.Flusher.
func (w *startWriter) Flush() {
	w.started = true
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *startWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// bound is an HTTP server and the listener it serves on.
type bound struct {
	srv *http.Server
	ln  net.Listener
}

// serve runs each server on its listener until ctx ends, then shuts them
// down gracefully: it stops accepting, and lets in-flight responses finish
// within grace.
func serve(ctx context.Context, log *slog.Logger, grace time.Duration, servers []bound) error {
	errc := make(chan error, len(servers))
	for _, b := range servers {
		s, ln := b.srv, b.ln
		log.Info("listening", "addr", ln.Addr().String())
		go func(s *http.Server) {
			if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve %s: %w", s.Addr, err)
			}
		}(s)
	}
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	log.Info("shutting down, letting in-flight requests finish", "grace", grace)
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	for _, b := range servers {
		if err := b.srv.Shutdown(sctx); err != nil {
			log.Warn("shutdown", "addr", b.srv.Addr, "err", err)
		}
	}
	return runErr
}

// startDaemon sets up what every long-running command needs: a JSON logger,
// a context that ends on SIGINT or SIGTERM, and a metrics registry.
func startDaemon(stderr io.Writer, level, pprofAddr string) (*slog.Logger, context.Context, context.CancelFunc, *prometheus.Registry, error) {
	log, err := newLogger(stderr, level)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	ctx, stop := signalContext()
	if pprofAddr != "" {
		if err := servePprof(ctx, log, pprofAddr); err != nil {
			stop()
			return nil, nil, nil, nil, err
		}
	}
	return log, ctx, stop, newRegistry(), nil
}

// servePprof serves net/http/pprof's handlers on addr until ctx ends.
func servePprof(ctx context.Context, log *slog.Logger, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("pprof: listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := newServer(addr, mux, log) // no write timeout: a CPU profile or trace streams for as long as asked
	go func() { _ = srv.Serve(l) }()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	log.Info("serving pprof", "addr", l.Addr().String())
	return nil
}

// addrReport says where runDaemon writes the addresses it serves on
// (--addr-file; empty path: nowhere), with info to add (the node's DHT
// addresses).
type addrReport struct {
	path string
	info map[string]any
}

// runDaemon serves h on main (with /healthz and /readyz), each extra on its
// listener, and the ops endpoints on metricsAddr until ctx ends; then it
// stops the background work and waits for it (runErr) before returning.
func runDaemon(ctx context.Context, stop context.CancelFunc, log *slog.Logger, grace time.Duration, main listener, metricsAddr string,
	reg *prometheus.Registry, ready func() error, runErr <-chan error, report addrReport, extra ...listener) error {
	ops := opsHandler(reg, ready)
	panics := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "shoal_panics_total", Help: "Panics recovered while serving a request (each one is logged at error level).",
	})
	if err := reg.Register(panics); err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	addrs := map[string]any{}
	for k, v := range report.info {
		addrs[k] = v
	}
	var servers []bound
	add := func(name string, ln net.Listener, h http.Handler) {
		servers = append(servers, bound{newServer(ln.Addr().String(), h, log), ln})
		addrs[name] = ln.Addr().String()
	}
	add(main.name, main.ln, withOps(recoverPanics(main.h, log, panics), ops))
	for _, l := range extra {
		add(l.name, l.ln, recoverPanics(l.h, log, panics))
	}
	if metricsAddr != "" {
		ln, err := bind("metrics-addr", metricsAddr)
		if err != nil {
			return err
		}
		add("metrics", ln, ops)
	}
	if report.path != "" {
		if err := writeAddrFile(report.path, addrs); err != nil {
			return err
		}
	}
	err := serve(ctx, log, grace, servers)
	stop()
	if rerr := <-runErr; rerr != nil && err == nil {
		err = rerr
	}
	return err
}

func newServer(addr string, h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
}

func runNode(args []string, stderr io.Writer) error {
	f := newFlags("node", "Run the per-node mirror: serve what this node's containerd holds, find the rest on peers through the DHT, and forward cluster-wide misses to the cache tier.", stderr)
	var (
		sock                                 = f.String("containerd-sock", "/run/containerd/containerd.sock", "containerd's gRPC socket")
		namespace                            = f.String("containerd-namespace", "k8s.io", "containerd namespace whose images are served")
		contentDir                           = f.String("containerd-content-dir", "", "containerd's content directory, for zero-copy serving (default: asked from containerd)")
		ctrdConfig                           = f.String("containerd-config", "/etc/containerd/config.toml", "containerd's config.toml, checked at start for settings that prevent mirroring (optional)")
		ctrdPoll                             = f.Duration("containerd-poll-interval", 10*time.Second, "rescan containerd's images this often, catching what its events miss (containerd 1.7 sends none for transfer-service pulls)")
		layoutDir                            = f.String("layout-dir", "", "serve an OCI image-layout directory instead of containerd (dev, air-gapped sites, tests)")
		registryAddr                         = f.String("registry-addr", "127.0.0.1:5000", "address of the registry (mirror) HTTP server that this node's containerd uses; keep it on loopback so that no pod can read the node's content through it")
		peerAddr                             = f.String("peer-addr", ":5002", "address of the peer HTTP server that other nodes fetch from; with --psk-file every request must carry a credential derived from the PSK; empty serves peers on the registry port (no separation)")
		advertise                            = f.String("advertise-addr", "", "host:port peers use to reach this node's peer server (default: the --peer-addr port, else the --registry-addr port, on the node's DHT address)")
		routerAddr                           = f.String("router-addr", ":5001", "libp2p DHT listen address (host:port or multiaddr); empty disables peers")
		metricsAddr                          = f.String("metrics-addr", ":9090", "address for /metrics, /healthz and /readyz; empty disables")
		dataDir                              = f.String("data-dir", "/var/lib/shoal", "directory for the node's persistent identity key")
		cacheURL                             = f.String("cache-url", "", "base URL of the cache tier (http or https) for cluster-wide misses and tag resolution")
		cacheToken                           = f.String("cache-token-file", "", "file holding the bearer token the cache tier requires (--client-token-file there)")
		cacheCA                              = f.String("cache-ca-file", "", "PEM bundle of the CAs that sign an https --cache-url (default: the system roots)")
		zone                                 = f.String("zone", "", "this node's topology zone; peers in the same zone are preferred")
		pskFile                              = f.String("psk-file", "", "libp2p pre-shared key (swarm.key format); only nodes with the same key can join. Only with a PSK do peers answer tag requests (when the cache tier cannot): without one, tags resolve only through the cache tier or this node's containerd")
		providerTTL                          = f.Duration("provider-ttl", 30*time.Minute, "how long a DHT provider record lives; a withdrawn key may cost a requester one 404 until then (dead nodes are skipped at once)")
		replication                          = f.Int("provider-replication", dht.DefaultReplicationFactor, "how many of the closest DHT peers keep each provider record")
		hedge                                = f.Duration("hedge-delay", 150*time.Millisecond, "wait this long for a peer's answer before asking the next one too")
		idleTimeout                          = f.Duration("relay-idle-timeout", 10*time.Second, "fail a relayed body (peer or cache tier) that sends no bytes for this long; a peer transfer then resumes on another source")
		stripeMin                            = f.String("stripe-min-size", "32MiB", "fetch blobs (or requested ranges) at least this large from several peers at once, as parallel ranges, when several hold them")
		stripePeers                          = f.Int("stripe-max-peers", 4, "at most this many peers serve one striped fetch; 1 turns striping off")
		verifyBlobs                          = f.Bool("verify-blobs", false, "hash relayed blobs and hold back their last chunk until the digest checks out, for clients that do not verify (containerd does); costs the zero-copy relay")
		grace, logLevel, pprofAddr, addrFile = f.daemonFlags()
		bootstrap                            listFlag
		registries                           listFlag
	)
	f.Var(&bootstrap, "bootstrap-peers", "peers to join: multiaddrs (with or without /p2p/<id>), host:port, or DNS names such as a headless Service (re-resolved periodically); repeatable or comma-separated")
	f.Var(&registries, "mirrored-registries", "registries this node mirrors; requests for others get 404 so containerd moves on (default: empty, every registry)")
	if err := f.parse(args); err != nil {
		return err
	}
	// An idle node's heap is mostly what it knows about peers' content;
	// collecting at 25% growth instead of Go's 100% keeps its memory
	// within what a DaemonSet pod on every node should cost. GOGC, when
	// set, still decides.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(nodeGCPercent)
	}
	log, ctx, stop, reg, err := startDaemon(stderr, *logLevel, *pprofAddr)
	if err != nil {
		return err
	}
	defer stop()

	var st node.Store
	if *layoutDir != "" {
		ls, err := layout.New(*layoutDir)
		if err != nil {
			return fmt.Errorf("layout store: %w", err)
		}
		st = ls
		log.Info("serving an OCI image layout", "dir", *layoutDir)
	} else {
		cs, err := ctrdstore.New(ctx, ctrdstore.Config{
			Address: *sock, Namespace: *namespace, ContentDir: *contentDir, ConfigPath: *ctrdConfig, PollInterval: *ctrdPoll,
			Logger: log.With("component", "store"), Registerer: reg,
		})
		if err != nil {
			return fmt.Errorf("containerd store: %w", err)
		}
		defer cs.Close()
		st = cs // New has checked containerd's configuration and logged any problem.
	}

	stripeMinSize, err := parseSize(*stripeMin)
	if err != nil || stripeMinSize <= 0 {
		return fmt.Errorf("--stripe-min-size %q: want a size above 0 (e.g. 32MiB)", *stripeMin)
	}
	if *stripePeers < 1 {
		return fmt.Errorf("--stripe-max-peers %d: want 1 (off) or more", *stripePeers)
	}
	cfg := node.Config{
		Store: st, CacheURL: *cacheURL, Zone: *zone, HedgeDelay: *hedge, VerifyBlobs: *verifyBlobs,
		StripeMinSize: stripeMinSize, StripeMaxPeers: *stripePeers,
		IdleTimeout: *idleTimeout, TrustPeerTags: *pskFile != "",
		Logger: log.With("component", "node"), Registerer: reg,
		Registries: registries,
	}
	if cfg.CacheTransport, err = cacheTransport(*cacheCA, *cacheToken); err != nil {
		return err
	}
	var psk []byte
	if *pskFile != "" {
		if psk, err = auth.LoadPSK(*pskFile); err != nil {
			return fmt.Errorf("--psk-file: %w", err)
		}
		cfg.PeerKey = auth.NewPeerKey(psk)
	}
	// Ports are bound first: with port 0 in an address, what the DHT
	// advertises is the port the kernel picked.
	regLn, err := bind("registry-addr", *registryAddr)
	if err != nil {
		return err
	}
	var peerLn net.Listener
	if *peerAddr != "" {
		if peerLn, err = bind("peer-addr", *peerAddr); err != nil {
			return err
		}
	}
	var router *dht.Router
	report := addrReport{path: *addrFile, info: map[string]any{}}
	if *routerAddr != "" {
		regAddr := *advertise
		switch {
		case regAddr != "":
		case peerLn != nil:
			regAddr = boundAddr(*peerAddr, peerLn)
		default:
			regAddr = boundAddr(*registryAddr, regLn)
		}
		if *peerAddr != "" && psk == nil {
			log.Warn("the peer port is not authenticated: any pod that reaches it can read this node's content; set --psk-file", "peer_addr", *peerAddr)
		}
		router, err = dht.New(ctx, dht.Config{
			ListenAddr: *routerAddr, DataDir: *dataDir, PSK: psk, BootstrapPeers: bootstrap,
			RegistryAddr: regAddr, Zone: *zone, ProviderTTL: *providerTTL, ReplicationFactor: *replication,
			Logger: log.With("component", "dht"), Registerer: reg,
		})
		if err != nil {
			return fmt.Errorf("dht: %w", err)
		}
		defer router.Close()
		cfg.Router = router
		log.Info("dht started", "id", router.ID(), "addrs", router.Addrs())
		report.info["router"] = router.Addrs()
	}
	nd, err := node.New(cfg)
	if err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- nd.Run(ctx) }()

	ready := func() error {
		if !nd.Ready() {
			return errors.New("store not yet advertised")
		}
		return nil
	}
	log.Info("shoal node starting", "version", buildVersion(), "registry", *registryAddr, "peer", *peerAddr,
		"peer_auth", !cfg.PeerKey.Empty(), "cache", *cacheURL != "")
	var extra []listener
	if peerLn != nil {
		extra = append(extra, listener{name: "peer", ln: peerLn, h: nd.PeerHandler()})
	}
	return runDaemon(ctx, stop, log, *grace, listener{name: "registry", ln: regLn, h: nd}, *metricsAddr, reg, ready, runErr, report, extra...)
}

// cacheTransport carries the node's requests to the cache tier: no HTTP
// proxy (it is a cluster-internal hop), short dial and header timeouts, the
// given CAs for https, and the client token. Nil means the node's default.
func cacheTransport(caFile, tokenFile string) (http.RoundTripper, error) {
	if caFile == "" && tokenFile == "" {
		return nil, nil
	}
	tr := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 10 * time.Second,
		DisableCompression:    true,
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--cache-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--cache-ca-file %s: no PEM certificates", caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	tok, err := auth.LoadToken(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("--cache-token-file: %w", err)
	}
	return tok.RoundTripper(tr), nil
}

func runConfigure(args []string, stderr io.Writer) error {
	f := newFlags("configure", "Write containerd hosts.toml files that make the local shoal node the first mirror for each registry, keeping any existing configuration; --remove restores it.", stderr)
	var (
		certsDir   = f.String("containerd-certs-dir", "/etc/containerd/certs.d", "containerd's registry config_path")
		mirrorURL  = f.String("mirror-url", "http://127.0.0.1:5000", "URL containerd uses to reach the local shoal node")
		dial       = f.Duration("dial-timeout", 200*time.Millisecond, "containerd's dial timeout for the mirror, so a dead node costs little")
		resolve    = f.Bool("resolve-tags", true, "let the mirror resolve tags (capability resolve), not only serve digests")
		remove     = f.Bool("remove", false, "remove shoal's files and restore what was there before")
		logLevel   = f.String("log-level", "info", "debug, info, warn or error")
		registries listFlag
	)
	f.Var(&registries, "mirrored-registries", "registries to configure (default: docker.io, ghcr.io, quay.io, registry.k8s.io, gcr.io); repeatable or comma-separated")
	if err := f.parse(args); err != nil {
		return err
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	cfg := mirror.Config{CertsDir: *certsDir, MirrorURL: *mirrorURL, Registries: registries, DialTimeout: *dial, ResolveTags: *resolve, Logger: log}
	ctx := context.Background()
	if *remove {
		return mirror.Remove(ctx, cfg)
	}
	return mirror.Configure(ctx, cfg)
}

// cacheFile is the optional YAML configuration of `shoal cache`.
type cacheFile struct {
	Upstreams []struct {
		Registry     string `yaml:"registry"`
		Endpoint     string `yaml:"endpoint"`
		Insecure     bool   `yaml:"insecure"`
		Credentials  string `yaml:"credentials"`
		TagFreshness string `yaml:"tagFreshness"`
	} `yaml:"upstreams"`
	Storage struct {
		Driver  string         `yaml:"driver"`
		Options map[string]any `yaml:"options"`
	} `yaml:"storage"`
}

// defaultUpstreams are served when neither --upstream nor --config names any.
var defaultUpstreams = []string{"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"}

// parseSize parses "0", "1048576", "512MiB", "50GiB", "1TB".
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return int64(n * float64(mult)), nil
}
