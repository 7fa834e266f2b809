package containerd

import (
	"context"
	"fmt"
	"os"
	"slices"

	"github.com/pelletier/go-toml/v2"
)

// Names of the containerd config problems CheckConfig reports; they are the
// values of the problem label of shoal_containerd_config_problem.
const (
	// ProblemCRIConfigPathUnset: the CRI registry has no config_path, so
	// containerd ignores the hosts.toml files that point at the node mirror.
	ProblemCRIConfigPathUnset = "cri_registry_config_path_unset"
	// ProblemTransferConfigPathUnset: the transfer service has no
	// config_path, so pulls through it bypass the node mirror.
	ProblemTransferConfigPathUnset = "transfer_config_path_unset"
	// ProblemDiscardUnpackedLayers: containerd deletes layers after
	// unpacking them, so this node has nothing to share with its peers.
	ProblemDiscardUnpackedLayers = "discard_unpacked_layers"
)

var allProblems = []string{ProblemCRIConfigPathUnset, ProblemTransferConfigPathUnset, ProblemDiscardUnpackedLayers}

// Problem is a containerd setting that defeats the node mirror.
type Problem struct {
	Name   string // one of the Problem* constants
	Detail string // what was found where, and how to fix it
}

// CheckConfig reports containerd settings that defeat the node mirror, from
// what containerd's introspection service exports (the v2 CRI image plugin
// exports its registry config_path and discard_unpacked_layers) and from
// Config.ConfigPath when set. It sets shoal_containerd_config_problem.
func (s *Store) CheckConfig(ctx context.Context) []Problem {
	var found []Problem
	add := func(p Problem) {
		if !slices.ContainsFunc(found, func(q Problem) bool { return q.Name == p.Name }) {
			found = append(found, p)
		}
	}
	resp, err := s.client.IntrospectionService().Plugins(s.nsCtx(ctx), `type=="io.containerd.cri.v1",id=="images"`)
	if err != nil {
		s.log.Debug("introspection failed; cannot check the CRI image plugin", "err", err)
	}
	for _, p := range resp.GetPlugins() {
		if p.GetInitErr() != nil {
			continue
		}
		ex := p.GetExports()
		if v, ok := ex["RegistryConfigPath"]; ok && v == "" {
			add(Problem{ProblemCRIConfigPathUnset, `containerd reports no [plugins."io.containerd.cri.v1.images".registry] config_path`})
		}
		if ex["DiscardUnpackedLayers"] == "true" {
			add(Problem{ProblemDiscardUnpackedLayers, `containerd reports [plugins."io.containerd.cri.v1.images"] discard_unpacked_layers = true`})
		}
	}
	if s.configPath != "" {
		ps, err := CheckConfigFile(s.configPath)
		if err != nil {
			s.log.Warn("cannot read containerd config", "path", s.configPath, "err", err)
		}
		for _, p := range ps {
			add(p)
		}
	}
	for _, name := range allProblems {
		v := 0.0
		if slices.ContainsFunc(found, func(p Problem) bool { return p.Name == name }) {
			v = 1
		}
		s.metrics.configProblem.WithLabelValues(name).Set(v)
	}
	return found
}

// CheckConfigFile reports the problems in a containerd config.toml: version
// 3 (containerd 2.x) or version 2 (containerd 1.7).
func CheckConfigFile(path string) ([]Problem, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read containerd config: %w", err)
	}
	var cfg map[string]any
	if err := toml.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("parse containerd config %s: %w", path, err)
	}
	return checkConfig(path, cfg), nil
}

func checkConfig(path string, cfg map[string]any) []Problem {
	version, _ := cfg["version"].(int64)
	disabled := map[string]bool{}
	if list, ok := cfg["disabled_plugins"].([]any); ok {
		for _, v := range list {
			if s, ok := v.(string); ok {
				disabled[s] = true
			}
		}
	}
	plugins, _ := cfg["plugins"].(map[string]any)
	var out []Problem
	switch {
	case version >= 3:
		const cri = "io.containerd.cri.v1.images"
		if !disabled[cri] && !disabled["io.containerd.grpc.v1.cri"] {
			if lookupString(plugins, cri, "registry", "config_path") == "" {
				out = append(out, Problem{ProblemCRIConfigPathUnset,
					fmt.Sprintf(`%s: set [plugins.%q.registry] config_path (for example "/etc/containerd/certs.d")`, path, cri)})
			}
			if lookupTrue(plugins, cri, "discard_unpacked_layers") {
				out = append(out, Problem{ProblemDiscardUnpackedLayers,
					fmt.Sprintf(`%s: set [plugins.%q] discard_unpacked_layers = false`, path, cri)})
			}
		}
		const transfer = "io.containerd.transfer.v1.local"
		if !disabled[transfer] && lookupString(plugins, transfer, "config_path") == "" {
			out = append(out, Problem{ProblemTransferConfigPathUnset,
				fmt.Sprintf(`%s: set [plugins.%q] config_path (for example "/etc/containerd/certs.d")`, path, transfer)})
		}
	default: // version 2 (containerd 1.7); version 1 is not supported by the mirror either
		const cri = "io.containerd.grpc.v1.cri"
		if !disabled[cri] {
			if lookupString(plugins, cri, "registry", "config_path") == "" {
				out = append(out, Problem{ProblemCRIConfigPathUnset,
					fmt.Sprintf(`%s: set [plugins.%q.registry] config_path (for example "/etc/containerd/certs.d")`, path, cri)})
			}
			if lookupTrue(plugins, cri, "containerd", "discard_unpacked_layers") {
				out = append(out, Problem{ProblemDiscardUnpackedLayers,
					fmt.Sprintf(`%s: set [plugins.%q.containerd] discard_unpacked_layers = false`, path, cri)})
			}
		}
	}
	return out
}

// lookup follows keys through nested tables; it returns nil when absent.
func lookup(m map[string]any, keys ...string) any {
	var cur any = m
	for _, k := range keys {
		t, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = t[k]
	}
	return cur
}

// lookupString is lookup for a string setting ("" when absent).
func lookupString(m map[string]any, keys ...string) string {
	s, _ := lookup(m, keys...).(string)
	return s
}

// lookupTrue reports whether a boolean setting is present and true.
func lookupTrue(m map[string]any, keys ...string) bool {
	b, _ := lookup(m, keys...).(bool)
	return b
}
