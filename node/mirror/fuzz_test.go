package mirror

import "testing"

// FuzzParseHostsFile: any hosts.toml either fails to parse or parses, and
// its host order can be read and rendered with shoal's mirror in front.
// Never a panic.
func FuzzParseHostsFile(f *testing.F) {
	for _, s := range []string{
		"server = \"https://registry-1.docker.io\"\n[host.\"http://127.0.0.1:5000\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
		"[host]\n", "server = 1\n", "[[host]]\n", "a.b.c = \"d\"\n[host.\"x\".header]\nk = [\"v\"]\n", "\x00",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		hf, err := parseHostsFile(b)
		if err != nil {
			return
		}
		_, _ = hostOrder(b)
		_, _ = render(Config{MirrorURL: "http://127.0.0.1:5000"}, "docker.io", hf)
	})
}
