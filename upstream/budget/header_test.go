package budget

import (
	"testing"
	"time"
)

func TestParseHeader(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		n      int
		window time.Duration
		ok     bool
	}{
		{"count_and_window", "100;w=21600", 100, 6 * time.Hour, true},
		{"count_only", "100", 100, 0, true},
		{"spaces_are_ignored", " 20 ; w=60 ", 20, time.Minute, true},
		{"unknown_parameters_are_ignored", "5;w=10;comment=x", 5, 10 * time.Second, true},
		{"zero_remaining", "0;w=21600", 0, 6 * time.Hour, true},
		{"empty_is_invalid", "", 0, 0, false},
		{"negative_is_invalid", "-1", 0, 0, false},
		{"garbage_is_invalid", "lots", 0, 0, false},
		{"bad_window_is_invalid", "100;w=soon", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, w, ok := ParseHeader(tt.in)
			if n != tt.n || w != tt.window || ok != tt.ok {
				t.Fatalf("ParseHeader(%q) = %d, %v, %v; want %d, %v, %v", tt.in, n, w, ok, tt.n, tt.window, tt.ok)
			}
		})
	}
}
