package budget

import (
	"testing"
	"time"
)

// FuzzParseRateLimit: ratelimit-* and Retry-After values never panic, never
// yield a negative count or duration, and never exceed the cap.
func FuzzParseRateLimit(f *testing.F) {
	for _, s := range []string{"100;w=21600", "0;w=60", "100", "100;w=9223372036854775807", "-1;w=5", "5;w=-3", "7;q=1;w=10", ";;", "18446744073709551616"} {
		f.Add(s)
	}
	now := time.Now()
	f.Fuzz(func(t *testing.T, v string) {
		n, w, ok := ParseHeader(v)
		if ok && (n < 0 || w < 0 || w > maxDelay) {
			t.Fatalf("ParseHeader(%q) = %d, %v", v, n, w)
		}
		d, ok := ParseRetryAfter(v, now)
		if ok && (d < 0 || d > maxDelay) {
			t.Fatalf("ParseRetryAfter(%q) = %v", v, d)
		}
	})
}
