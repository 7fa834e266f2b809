//go:build !nocache

package main

// The cache tier's command. The node image's binary (/shoal-node) is built
// with -tags nocache, which leaves this file and everything only the cache
// tier links (distribution's storage, Redis, the upstream client) out of the
// node: about 12 MiB less resident memory per node.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/redis/go-redis/v9"
	"github.com/shoal-oci/shoal/auth"
	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/health"
	"github.com/shoal-oci/shoal/cache/herd"
	"github.com/shoal-oci/shoal/cache/recency"
	"github.com/shoal-oci/shoal/oci"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
	"github.com/sirupsen/logrus"
	"gopkg.in/yaml.v3"
)

func runCache(args []string, stderr io.Writer) error {
	f := newFlags("cache", "Run the shared pull-through cache: fetch each digest from upstream once, revalidate tags with free HEAD requests, keep within the Docker Hub budget, and serve stale content when upstream is limited or down.", stderr)
	var (
		addr                                 = f.String("addr", ":5000", "address of the registry HTTP server")
		metricsAddr                          = f.String("metrics-addr", ":9091", "address for /metrics, /healthz and /readyz; empty disables")
		dataDir                              = f.String("data-dir", "shoal-data", "directory for the filesystem storage and the fetch spool")
		storageName                          = f.String("storage", "filesystem", "storage driver: filesystem, inmemory, s3, gcs or azure")
		configFile                           = f.String("config", "", "YAML file with upstreams (registry, endpoint, insecure, credentials, tagFreshness) and storage (driver, options)")
		credsFile                            = f.String("credentials-file", "", "upstream credentials: a docker config.json, or a kubernetes.io/dockerconfigjson Secret (file or mount directory); reloaded on change")
		redisURL                             = f.String("redis-url", "", "Redis URL to share fetch leases and the rate-limit budget across replicas: redis://[:password@]host:6379/0, or for Redis Sentinel redis://[sentinel-password@]sentinel1:26379/0?master_name=NAME&addr=sentinel2:26379&password=REDIS-PASSWORD; empty keeps them in process")
		freshness                            = f.Duration("tag-freshness", 5*time.Minute, "serve a cached tag this long without asking upstream; then revalidate with a free HEAD; 0 revalidates every pull")
		reserve                              = f.Int("budget-reserve", 10, "counted upstream requests kept for cold pulls (content never cached) when the budget runs low")
		clientShare                          = f.Float64("budget-client-share", 1, "the share (0-1] of a window's counted pulls that one client (node, by address) may cause; past it that client gets 429 and the rest is kept for the others; 1 disables the cap")
		maxSize                              = f.String("max-size", "0", "bound on stored blobs (e.g. 50GiB); least recently used content goes first, never a blob a cached manifest references; 0 = unbounded")
		evictInterval                        = f.Duration("evict-interval", time.Minute, "how often a replica checks --max-size and evicts; with Redis, one pass runs at a time across replicas")
		evictGrace                           = f.Duration("evict-grace", cache.DefaultEvictGrace, "never evict content used this recently: a pull in progress has its manifest and is still fetching layers")
		advertiseURL                         = f.String("advertise-url", "", "base URL at which the other replicas reach this one (http://POD_IP:5000); a replica waiting on this one's fetch then streams it as it arrives instead of waiting for the commit; empty: others wait")
		tokenFile                            = f.String("client-token-file", "", "require this bearer token from clients (nodes); empty accepts any client")
		upTimeout                            = f.Duration("upstream-timeout", 5*time.Second, "deadline for a revalidation or manifest fetch; past it a cached tag is served stale")
		upIdle                               = f.Duration("upstream-idle-timeout", 30*time.Second, "fail a blob fetch whose upstream sends no bytes for this long, so a stalled upstream holds no waiter")
		herdDirect                           = f.Int("herd-direct", 1, "when many nodes ask for one blob at once (a scale-out), serve this many of them and chain the rest behind the nodes already receiving it, so the cache tier sends this many copies, not one per node; each chain shares the cache tier's uplink; 0 serves every node")
		grace, logLevel, pprofAddr, addrFile = f.daemonFlags()
		upstreams                            listFlag
		storageOpts                          listFlag
	)
	f.Var(&upstreams, "upstream", "an upstream registry as host=endpoint (docker.io=https://registry-1.docker.io); repeatable; a bare host means https://host")
	f.Var(&storageOpts, "storage-opt", "a storage driver parameter as key=value (bucket=..., region=...); repeatable")
	if err := f.parse(args); err != nil {
		return err
	}
	if *freshness < 0 {
		return fmt.Errorf("--tag-freshness %s: must be 0 or more", *freshness)
	}
	log, ctx, stop, reg, err := startDaemon(stderr, *logLevel, *pprofAddr)
	if err != nil {
		return err
	}
	defer stop()
	// The registry port is bound first: an --advertise-url with port 0
	// means the port --addr bound (for --addr host:0).
	ln, err := bind("addr", *addr)
	if err != nil {
		return err
	}
	advertise, err := advertisedURL(*advertiseURL, ln)
	if err != nil {
		return err
	}
	// distribution's storage logs through logrus: keep it JSON and quiet, beside our slog lines.
	logrus.SetFormatter(&logrus.JSONFormatter{})
	logrus.SetOutput(stderr)
	logrus.SetLevel(logrus.WarnLevel)

	var file cacheFile
	if *configFile != "" {
		b, err := os.ReadFile(*configFile)
		if err != nil {
			return fmt.Errorf("--config: %w", err)
		}
		if err := yaml.Unmarshal(b, &file); err != nil {
			return fmt.Errorf("--config %s: %w", *configFile, err)
		}
	}
	ucfg := upstream.Config{Registries: map[string]upstream.Registry{}}
	credRefs := map[string]string{}
	freshnessBy := map[string]time.Duration{}
	for _, u := range upstreams {
		host, endpoint, _ := strings.Cut(u, "=")
		host, err := oci.NormalizeRegistry(strings.TrimSpace(host))
		if err != nil {
			return fmt.Errorf("--upstream %q: bad registry host", u)
		}
		ucfg.Registries[host] = upstream.Registry{Host: host, Endpoint: strings.TrimSpace(endpoint), Insecure: strings.HasPrefix(endpoint, "http://")}
	}
	for _, u := range file.Upstreams {
		host, err := oci.NormalizeRegistry(u.Registry)
		if err != nil {
			return fmt.Errorf("--config: upstream %q: bad registry host", u.Registry)
		}
		ucfg.Registries[host] = upstream.Registry{Host: host, Endpoint: u.Endpoint, Insecure: u.Insecure || strings.HasPrefix(u.Endpoint, "http://")}
		if u.Credentials != "" {
			credRefs[host] = u.Credentials
		}
		if u.TagFreshness != "" {
			d, err := time.ParseDuration(u.TagFreshness)
			if err != nil {
				return fmt.Errorf("--config: upstream %s: tagFreshness: %w", host, err)
			}
			freshnessBy[host] = d
		}
	}
	if len(ucfg.Registries) == 0 {
		for _, h := range defaultUpstreams {
			ucfg.Registries[h] = upstream.Registry{Host: h}
		}
	}
	registries := make([]string, 0, len(ucfg.Registries))
	for h := range ucfg.Registries {
		registries = append(registries, h)
	}

	var keychain authn.Keychain = authn.NewMultiKeychain() // anonymous
	if *credsFile != "" {
		kc, err := auth.NewFileKeychain(*credsFile, auth.WithLogger(log.With("component", "credentials")))
		if err != nil {
			return fmt.Errorf("--credentials-file: %w", err)
		}
		keychain = credentialRefs{inner: kc, refs: credRefs}
	}

	var rdb *redis.Client
	if *redisURL != "" {
		if rdb, err = newRedisClient(*redisURL); err != nil {
			return fmt.Errorf("--redis-url: %w", err)
		}
		defer rdb.Close()
	}
	var state budget.State = budget.NewMemoryState()
	var redisHealth *health.Watcher
	if rdb != nil {
		// A Redis outage degrades this replica to in-process leases and
		// budget; it never makes the replica unready.
		redisHealth, err = health.New("redis", func(ctx context.Context) error { return rdb.Ping(ctx).Err() },
			time.Second, log.With("component", "redis"), reg)
		if err != nil {
			return err
		}
		go redisHealth.Run(ctx)
		state = budget.NewFallbackState(budget.NewRedisState(rdb, "shoal:budget:"), state, redisHealth)
	}
	if *clientShare <= 0 || *clientShare > 1 {
		return fmt.Errorf("--budget-client-share %v: want a share in (0, 1]", *clientShare)
	}
	bud := budget.New(state, budget.WithReserve(*reserve), budget.WithClientShare(*clientShare), budget.WithLogger(log.With("component", "budget")))
	if err := reg.Register(bud.Collector()); err != nil {
		return err
	}
	up, err := upstream.New(ucfg, upstream.WithKeychain(keychain), upstream.WithObserver(bud),
		upstream.WithRegisterer(reg), upstream.WithLogger(log.With("component", "upstream")),
		upstream.WithUserAgent("shoal/"+buildVersion()))
	if err != nil {
		return fmt.Errorf("upstream: %w", err)
	}

	local, err := flight.NewLocal(filepath.Join(*dataDir, "spool"), flight.WithLogger(log.With("component", "flight")), flight.WithRegisterer(reg))
	if err != nil {
		return err
	}
	var fl cache.Flight = local
	if rdb != nil {
		fl = flight.NewRedis(local, rdb, flight.WithLogger(log.With("component", "flight")), flight.WithHealth(redisHealth),
			flight.WithAdvertise(advertise))
	}

	driverName, params := *storageName, map[string]any{}
	if file.Storage.Driver != "" {
		driverName, params = file.Storage.Driver, file.Storage.Options
		if params == nil {
			params = map[string]any{}
		}
	}
	for _, kv := range storageOpts {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--storage-opt %q: want key=value", kv)
		}
		params[k] = v
	}
	if driverName == "filesystem" && params["rootdirectory"] == nil {
		params["rootdirectory"] = filepath.Join(*dataDir, "registry")
	}
	driver, err := cache.NewDriver(ctx, driverName, params)
	if err != nil {
		return err
	}
	limit, err := parseSize(*maxSize)
	if err != nil {
		return fmt.Errorf("--max-size: %w", err)
	}
	token, err := auth.LoadToken(*tokenFile)
	if err != nil {
		return fmt.Errorf("--client-token-file: %w", err)
	}
	var share cache.EvictShare
	if rdb != nil {
		rs := recency.NewRedis(rdb, "shoal:evict:", redisHealth, log.With("component", "recency"))
		go rs.Run(ctx)
		share = rs
	}
	var tracker cache.Herd
	if *herdDirect > 0 {
		local, err := herd.New(herd.Config{Direct: *herdDirect, Registerer: reg})
		if err != nil {
			return err
		}
		tracker = local
		if rdb != nil {
			// One herd per blob across all replicas; each alone while Redis is down.
			tracker = herd.NewShared(rdb, "shoal:herd:", local, redisHealth, log.With("component", "herd"))
		}
	} else if *herdDirect < 0 {
		return fmt.Errorf("--herd-direct %d: must be 0 or more", *herdDirect)
	}
	c, err := cache.New(ctx, cache.Config{
		EvictShare:    share,
		Herd:          tracker,
		ReplicaClient: &http.Client{Transport: token.RoundTripper(cache.ReplicaTransport())},
		Driver:        driver, Upstream: up, Flight: fl, Budget: bud, Registries: registries,
		TagFreshness: *freshness, TagFreshnessBy: freshnessBy, UpstreamTimeout: *upTimeout, UpstreamIdleTimeout: *upIdle, MaxSize: limit,
		EvictInterval: *evictInterval, EvictGrace: *evictGrace,
		Logger: log.With("component", "cache"), Registerer: reg,
	})
	if err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(ctx) }()
	// Ready means "can serve": the storage answers. Redis is not required.
	ready := func() error {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return c.Ready(pctx)
	}
	log.Info("shoal cache starting", "version", buildVersion(), "addr", *addr, "storage", driverName,
		"upstreams", registries, "redis", rdb != nil, "client_token", !token.Empty())
	return runDaemon(ctx, stop, log, *grace, listener{name: "registry", ln: ln, h: token.Middleware(c)}, *metricsAddr, reg, ready, runErr, addrReport{path: *addrFile})
}

// credentialRefs lets an upstream use the credentials stored under another
// host name (the YAML "credentials" reference).
type credentialRefs struct {
	inner *auth.FileKeychain
	refs  map[string]string
}

// Resolve implements authn.Keychain.
func (c credentialRefs) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if ref, ok := c.refs[auth.NormalizeHost(r.RegistryStr())]; ok {
		reg, err := name.NewRegistry(ref)
		if err != nil {
			return nil, fmt.Errorf("credentials reference %q: %w", ref, err)
		}
		return c.inner.Resolve(reg)
	}
	return c.inner.Resolve(r)
}

// Account returns the non-secret account label of the credentials used for host.
func (c credentialRefs) Account(host string) string {
	if ref, ok := c.refs[auth.NormalizeHost(host)]; ok {
		return c.inner.Account(ref)
	}
	return c.inner.Account(host)
}

// newRedisClient connects to the Redis that --redis-url names: a plain
// server, or a primary found through Redis Sentinel when the URL carries
// master_name (go-redis's failover URL form). The Sentinel client follows
// a failover to the new primary. Every call is bounded by its caller's
// context, and retried once: a stopped Redis must cost a request a moment,
// not go-redis's retries. Errors never quote the URL, which may hold a
// password.
func newRedisClient(rawURL string) (*redis.Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, errors.New("not a URL")
	}
	if u.Query().Has("master_name") {
		opt, err := redis.ParseFailoverURL(rawURL)
		if err != nil {
			return nil, fmt.Errorf("sentinel URL: %w", redactErr(err, rawURL))
		}
		if opt.MasterName == "" {
			return nil, errors.New("sentinel URL: master_name is empty")
		}
		opt.ContextTimeoutEnabled = true
		if opt.MaxRetries == 0 {
			opt.MaxRetries = 1
		}
		return redis.NewFailoverClient(opt), nil
	}
	opt, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, redactErr(err, rawURL)
	}
	opt.ContextTimeoutEnabled = true
	if opt.MaxRetries == 0 {
		opt.MaxRetries = 1
	}
	return redis.NewClient(opt), nil
}

// redactErr drops err's text if it quotes the URL.
func redactErr(err error, rawURL string) error {
	if strings.Contains(err.Error(), rawURL) {
		return errors.New("invalid Redis URL")
	}
	return err
}

// advertisedURL is --advertise-url without a trailing slash, its port 0 (if
// given) replaced by the port ln bound.
func advertisedURL(raw string, ln net.Listener) (string, error) {
	raw = strings.TrimSuffix(raw, "/")
	if raw == "" {
		return "", nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return "", fmt.Errorf("--advertise-url %q: want http(s)://host:port", raw)
	}
	if u.Port() == "0" {
		u.Host = net.JoinHostPort(u.Hostname(), boundPort(ln))
	}
	return u.String(), nil
}
