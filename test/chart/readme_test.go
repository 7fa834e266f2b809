package chart

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestReadmeListsEveryValue checks that the chart README has a row for every
// key in values.yaml, down to the leaves the chart reads.
func TestReadmeListsEveryValue(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(chartDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, val := range m {
			p := strings.TrimPrefix(prefix+"."+k, ".")
			sub, ok := val.(map[string]any)
			// resources are Kubernetes' own shape: the README lists the block.
			if ok && len(sub) > 0 && !strings.HasSuffix(p, "resources") {
				walk(p, sub)
				continue
			}
			paths = append(paths, p)
		}
	}
	walk("", v)
	if len(paths) < 50 {
		t.Fatalf("only %d value paths found", len(paths))
	}
	for _, p := range paths {
		if !strings.Contains(string(readme), "| `"+p+"` |") {
			t.Errorf("README.md does not list value %s", p)
		}
	}
}
