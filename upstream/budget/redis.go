package budget

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisState is a State shared by every replica that uses the same Redis and
// prefix. Each record is one JSON string key, updated with WATCH/MULTI so
// concurrent replicas never lose an update, and expiring with its record.
type RedisState struct {
	c      redis.UniversalClient
	prefix string
}

// NewRedisState returns a State in Redis under keys that start with prefix
// (for example "shoal:budget:").
func NewRedisState(client redis.UniversalClient, prefix string) *RedisState {
	return &RedisState{c: client, prefix: prefix}
}

const redisMaxAttempts = 100

func (s *RedisState) key(k Key) string {
	return s.prefix + url.PathEscape(k.Upstream) + "/" + url.PathEscape(k.Account)
}

func decode(b []byte, key Key) (Record, error) {
	r := Record{Key: key}
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{Key: key}, fmt.Errorf("budget: decode record %s/%s: %w", key.Upstream, key.Account, err)
	}
	r.Key = key
	return r, nil
}

// Load implements State.
func (s *RedisState) Load(ctx context.Context, key Key) (Record, error) {
	b, err := s.c.Get(ctx, s.key(key)).Bytes()
	if errors.Is(err, redis.Nil) {
		return Record{Key: key}, nil
	}
	if err != nil {
		return Record{Key: key}, fmt.Errorf("budget: load %s/%s: %w", key.Upstream, key.Account, err)
	}
	return decode(b, key)
}

// Update implements State. It retries when another writer changed the key
// between the read and the write.
func (s *RedisState) Update(ctx context.Context, key Key, fn func(*Record) time.Duration) (Record, error) {
	k := s.key(key)
	var out Record
	txf := func(tx *redis.Tx) error {
		r := Record{Key: key}
		b, err := tx.Get(ctx, k).Bytes()
		switch {
		case errors.Is(err, redis.Nil):
		case err != nil:
			return err
		default:
			if r, err = decode(b, key); err != nil {
				return err
			}
		}
		ttl := max(fn(&r), time.Millisecond)
		r.Key = key
		data, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if _, err := tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, k, data, ttl)
			return nil
		}); err != nil {
			return err
		}
		out = r
		return nil
	}
	for attempt := range redisMaxAttempts {
		err := s.c.Watch(ctx, txf, k)
		if err == nil {
			return out, nil
		}
		if !errors.Is(err, redis.TxFailedErr) {
			return Record{Key: key}, fmt.Errorf("budget: update %s/%s: %w", key.Upstream, key.Account, err)
		}
		backoff := time.Duration(rand.Int64N(int64(min(attempt+1, 20)) * int64(time.Millisecond)))
		select {
		case <-ctx.Done():
			return Record{Key: key}, fmt.Errorf("budget: update %s/%s: %w", key.Upstream, key.Account, ctx.Err())
		case <-time.After(backoff):
		}
	}
	return Record{Key: key}, fmt.Errorf("budget: update %s/%s: too much contention", key.Upstream, key.Account)
}

// List implements State.
func (s *RedisState) List(ctx context.Context) ([]Record, error) {
	match := globEscape(s.prefix) + "*"
	var out []Record
	iter := s.c.Scan(ctx, 0, match, 100).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		b, err := s.c.Get(ctx, k).Bytes()
		if errors.Is(err, redis.Nil) {
			continue // expired since the scan saw it
		}
		if err != nil {
			return nil, fmt.Errorf("budget: list: %w", err)
		}
		key, ok := s.parseKey(k)
		if !ok {
			continue
		}
		r, err := decode(b, key)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("budget: list: %w", err)
	}
	sortRecords(out)
	return out, nil
}

func (s *RedisState) parseKey(k string) (Key, bool) {
	up, acct, ok := strings.Cut(strings.TrimPrefix(k, s.prefix), "/")
	if !ok {
		return Key{}, false
	}
	up, err1 := url.PathUnescape(up)
	acct, err2 := url.PathUnescape(acct)
	return Key{Upstream: up, Account: acct}, err1 == nil && err2 == nil
}

func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}
