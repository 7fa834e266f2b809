//go:build !nocache

package main

import (
	"net"
	"strconv"
	"strings"
	"testing"
)

func TestNewRedisClient(t *testing.T) {
	for _, tc := range []struct {
		url      string
		addr     string // "" for the failover client
		wantFail bool
	}{
		{url: "redis://127.0.0.1:6379/0", addr: "127.0.0.1:6379"},
		{url: "redis://:s3cret@127.0.0.1:6380/1", addr: "127.0.0.1:6380"},
		{url: "redis://127.0.0.1:26379/0?master_name=shoal&addr=127.0.0.1:26380"},
		{url: "redis://127.0.0.1:26379/0?master_name=", wantFail: true},
		{url: "redis://127.0.0.1:26379/0?master_name=shoal&bogus=1", wantFail: true},
		{url: "redis://:s3cret@127.0.0.1:6379/notadb", wantFail: true},
		{url: "http://:s3cret@127.0.0.1:6379/0", wantFail: true},
		{url: "redis://:s3cret@[::1/0", wantFail: true},
	} {
		c, err := newRedisClient(tc.url)
		if tc.wantFail {
			if err == nil {
				c.Close()
				t.Errorf("%s: accepted", tc.url)
			} else if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("%s: the error quotes the password: %v", tc.url, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.url, err)
			continue
		}
		if tc.addr != "" && c.Options().Addr != tc.addr {
			t.Errorf("%s: client for %s, want %s", tc.url, c.Options().Addr, tc.addr)
		}
		if !c.Options().ContextTimeoutEnabled || c.Options().MaxRetries != 1 {
			t.Errorf("%s: ContextTimeoutEnabled=%v MaxRetries=%d, want true and 1", tc.url, c.Options().ContextTimeoutEnabled, c.Options().MaxRetries)
		}
		c.Close()
	}
}

func TestAdvertisedURLTakesTheBoundPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	for _, c := range []struct{ in, want string }{
		{"", ""},
		{"http://10.0.0.5:5000/", "http://10.0.0.5:5000"},
		{"http://10.0.0.5:0", "http://10.0.0.5:" + port},
		{"https://cache-0.shoal:0/", "https://cache-0.shoal:" + port},
	} {
		got, err := advertisedURL(c.in, ln)
		if err != nil || got != c.want {
			t.Errorf("advertisedURL(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"10.0.0.5:5000", "ftp://x:1", "http://"} {
		if _, err := advertisedURL(bad, ln); err == nil {
			t.Errorf("advertisedURL(%q) accepted", bad)
		}
	}
	if got := boundAddr(":0", ln); got != ":"+port {
		t.Errorf("boundAddr(:0) = %q, want :%s", got, port)
	}
}
