package herd

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Health says whether Redis is reachable now (*health.Watcher implements it).
type Health interface {
	Up() bool
	Report(err error)
}

// Shared is a tracker whose herds live in Redis, so that all replicas of
// the cache tier chain one herd per blob: with three replicas behind one
// Service, a scale-out still costs Direct copies, not three times that.
// Each Join is one Lua script, atomic across replicas. While Redis is
// unreachable, each replica tracks its own herds (the Tracker it was given)
// and a herd costs at most Direct copies per replica.
type Shared struct {
	c      redis.UniversalClient
	prefix string
	local  *Tracker
	health Health
	log    *slog.Logger
	join   *redis.Script
}

// NewShared returns a Shared tracker under keys that start with prefix
// ("shoal:herd:"). local supplies the configuration and the metrics, and
// serves while Redis is down. health and log may be nil.
func NewShared(c redis.UniversalClient, prefix string, local *Tracker, health Health, log *slog.Logger) *Shared {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Shared{c: c, prefix: prefix, local: local, health: health, log: log, join: redis.NewScript(joinScript)}
}

// joinScript is Tracker.Join on a Redis hash (KEYS[1]: "roots", "members",
// "m:<node>" = "<parent>|<depth>|<d or c>" and "a:<node>" = its addresses)
// and a sorted set of the tails by depth (KEYS[2]). ARGV: node, force,
// direct, max members, max receivers, linger in ms, the node's addresses.
// It returns the decision, then each receiver's ID and addresses.
const joinScript = `
local h, tails = KEYS[1], KEYS[2]
local node, force = ARGV[1], ARGV[2] == "1"
local direct, maxm, maxr, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if ARGV[7] ~= "" then redis.call("HSET", h, "a:" .. node, ARGV[7]) end
local function ancestors(id)
  local out = {"redirected"}
  local cur = redis.call("HGET", h, "m:" .. id)
  while cur and #out <= 2 * maxr do
    local parent = string.match(cur, "^([^|]*)|")
    if parent == nil or parent == "" then break end
    table.insert(out, parent)
    table.insert(out, redis.call("HGET", h, "a:" .. parent) or "")
    cur = redis.call("HGET", h, "m:" .. parent)
  end
  return out
end
local me = redis.call("HGET", h, "m:" .. node)
local result
if me and not force and string.sub(me, -1) == "c" then
  result = ancestors(node)
elseif (not me) and (not force) and tonumber(redis.call("HGET", h, "roots") or "0") >= direct
    and tonumber(redis.call("HGET", h, "members") or "0") < maxm
    and redis.call("ZCARD", tails) > 0 then
  local t = redis.call("ZRANGE", tails, 0, 0, "WITHSCORES")
  local parent, depth = t[1], tonumber(t[2]) + 1
  redis.call("ZREM", tails, parent)
  redis.call("HSET", h, "m:" .. node, parent .. "|" .. depth .. "|c")
  redis.call("ZADD", tails, depth, node)
  redis.call("HINCRBY", h, "members", 1)
  result = ancestors(node)
else
  if not me then
    redis.call("HSET", h, "m:" .. node, "|0|d")
    redis.call("HINCRBY", h, "roots", 1)
    redis.call("HINCRBY", h, "members", 1)
    redis.call("ZADD", tails, 0, node)
  end
  if force then result = {"forced"} else result = {"direct"} end
end
redis.call("PEXPIRE", h, ttl)
redis.call("PEXPIRE", tails, ttl)
return result
`

// Join is Tracker.Join on the herds all replicas share.
func (s *Shared) Join(key string, node Member, force bool) (receivers []Member, done func(sent int64)) {
	if s.health != nil && !s.health.Up() {
		return s.local.Join(key, node, force)
	}
	cfg := s.local.cfg
	hk, tk := s.prefix+key, s.prefix+key+":tails"
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	f := "0"
	if force {
		f = "1"
	}
	res, err := s.join.Run(ctx, s.c, []string{hk, tk}, node.ID, f, cfg.Direct, cfg.MaxMembers, cfg.MaxReceivers, cfg.Linger.Milliseconds(), node.Addrs).StringSlice()
	if err != nil || len(res) == 0 {
		if s.health != nil && err != nil {
			s.health.Report(err)
		}
		s.log.Warn("shared herd unavailable; this replica tracks the herd alone", "err", err)
		return s.local.Join(key, node, force)
	}
	s.local.metrics.requests.WithLabelValues(res[0]).Inc()
	if res[0] == "redirected" {
		for i := 1; i+1 < len(res); i += 2 {
			receivers = append(receivers, Member{ID: res[i], Addrs: res[i+1]})
		}
		if len(receivers) > 0 {
			return receivers, nil
		}
	}
	// A direct stream keeps its herd alive while it runs, however long.
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(cfg.Linger / 2)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				ms := strconv.FormatInt(cfg.Linger.Milliseconds(), 10)
				s.c.Do(ctx, "PEXPIRE", hk, ms)
				s.c.Do(ctx, "PEXPIRE", tk, ms)
				cancel()
			}
		}
	}()
	var once sync.Once
	return nil, func(int64) { once.Do(func() { close(stop) }) }
}
