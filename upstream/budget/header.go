package budget

import (
	"strconv"
	"strings"
	"time"
)

// ParseHeader parses a rate-limit header value such as "100;w=21600" (100
// requests per 21600 seconds) or a bare "100". window is 0 when the value
// names none. ok is false for anything else, including negative numbers.
func ParseHeader(v string) (n int, window time.Duration, ok bool) {
	parts := strings.Split(v, ";")
	n, err := strconv.Atoi(strings.TrimSpace(parts[0]))
	if err != nil || n < 0 {
		return 0, 0, false
	}
	for _, p := range parts[1:] {
		k, val, found := strings.Cut(strings.TrimSpace(p), "=")
		if !found || strings.TrimSpace(k) != "w" {
			continue // unknown parameters are allowed and ignored
		}
		s, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil || s < 0 {
			return 0, 0, false
		}
		window = seconds(s)
	}
	return n, window, true
}

// maxDelay caps a window or a Retry-After. A larger value is bogus, and
// would overflow a time.Duration (about 292 years) if taken as it comes.
const maxDelay = 7 * 24 * time.Hour

// seconds converts a header's count of seconds to a Duration, capped at maxDelay.
func seconds(s int) time.Duration {
	if s >= int(maxDelay/time.Second) {
		return maxDelay
	}
	return time.Duration(s) * time.Second
}
