package store

import "testing"

func TestTagKey(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		want   string
		wantOK bool
	}{
		{"docker_hub_short_name_is_expanded", "alpine:3.20", "docker.io/library/alpine:3.20", true},
		{"full_name_is_kept", "docker.io/library/alpine:3.20", "docker.io/library/alpine:3.20", true},
		{"other_registry_is_kept", "ghcr.io/org/app:v1", "ghcr.io/org/app:v1", true},
		{"registry_with_port", "127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", true},
		{"digest_only_has_no_tag", "docker.io/library/alpine@sha256:" + hex64, "", false},
		{"tag_and_digest_has_no_tag", "alpine:3.20@sha256:" + hex64, "", false},
		{"untagged_name_has_no_tag", "docker.io/library/alpine", "", false},
		{"bare_digest_is_not_a_ref", "sha256:" + hex64, "", false},
		{"garbage_is_not_a_ref", "Not A Ref", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := TagKey(tt.in)
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("TagKey(%q) = %q, %v; want %q, %v", tt.in, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestDiff(t *testing.T) {
	set := func(ks ...string) map[string]struct{} {
		m := map[string]struct{}{}
		for _, k := range ks {
			m[k] = struct{}{}
		}
		return m
	}
	added, removed := Diff(set("a", "b", "c"), set("b", "d", "c", "e"))
	if len(added) != 2 || added[0] != "d" || added[1] != "e" {
		t.Errorf("added = %v, want [d e]", added)
	}
	if len(removed) != 1 || removed[0] != "a" {
		t.Errorf("removed = %v, want [a]", removed)
	}
	if a, r := Diff(set("x"), set("x")); len(a)+len(r) != 0 {
		t.Errorf("equal sets: added %v removed %v, want none", a, r)
	}
}
