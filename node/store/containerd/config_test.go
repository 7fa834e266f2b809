package containerd

import (
	"slices"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

func TestCheckConfigFile(t *testing.T) {
	tests := []struct {
		name string
		toml string
		want []string
	}{
		{"v3_complete_config_is_fine", `version = 3
[plugins."io.containerd.cri.v1.images"]
  discard_unpacked_layers = false
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "/etc/containerd/certs.d"
`, nil},
		{"v3_defaults_lack_both_config_paths", `version = 3`, []string{ProblemCRIConfigPathUnset, ProblemTransferConfigPathUnset}},
		{"v3_discard_unpacked_layers", `version = 3
[plugins."io.containerd.cri.v1.images"]
  discard_unpacked_layers = true
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "/etc/containerd/certs.d"
`, []string{ProblemDiscardUnpackedLayers}},
		{"v3_cri_disabled_checks_only_transfer", `version = 3
disabled_plugins = ["io.containerd.cri.v1.images"]
`, []string{ProblemTransferConfigPathUnset}},
		{"v2_complete_config_is_fine", `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
`, nil},
		{"v2_missing_config_path_and_discard", `version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = true
`, []string{ProblemCRIConfigPathUnset, ProblemDiscardUnpackedLayers}},
		{"v2_cri_disabled_is_fine", `version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var cfg map[string]any
			if err := toml.Unmarshal([]byte(tt.toml), &cfg); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, p := range checkConfig("config.toml", cfg) {
				got = append(got, p.Name)
			}
			slices.Sort(got)
			want := slices.Sorted(slices.Values(tt.want))
			if !slices.Equal(got, want) {
				t.Fatalf("problems = %v, want %v", got, want)
			}
		})
	}
}
