package mirror

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// hostsFile is an existing hosts.toml: its top-level keys (server and the
// settings that apply to it) and its [host."..."] tables in file order, which
// is the order containerd tries them in.
type hostsFile struct {
	root  map[string]any
	hosts []namedHost
}

type namedHost struct {
	name string
	cfg  map[string]any
}

func parseHostsFile(b []byte) (*hostsFile, error) {
	var m map[string]any
	if err := toml.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	hf := &hostsFile{root: map[string]any{}}
	var hostMap map[string]any
	for k, v := range m {
		if k == "host" {
			hm, ok := v.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("key host is a %T, want a table", v)
			}
			hostMap = hm
			continue
		}
		hf.root[k] = v
	}
	order, err := hostOrder(b)
	if err != nil {
		return nil, err
	}
	// Hosts written in a form the scan does not see (inline tables) go last,
	// sorted, so the result is still deterministic.
	for _, name := range slices.Sorted(maps.Keys(hostMap)) {
		if !slices.Contains(order, name) {
			order = append(order, name)
		}
	}
	for _, name := range order {
		v, ok := hostMap[name]
		if !ok {
			continue
		}
		cfg, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("host %q is a %T, want a table", name, v)
		}
		hf.hosts = append(hf.hosts, namedHost{name: name, cfg: cfg})
	}
	return hf, nil
}

// hostOrder lists the names of [host."..."] tables in the order they appear.
func hostOrder(b []byte) ([]string, error) {
	var p unstable.Parser
	p.Reset(b)
	var order []string
	for p.NextExpression() {
		e := p.Expression()
		if e.Kind != unstable.Table {
			continue
		}
		var parts []string
		for it := e.Key(); it.Next(); {
			parts = append(parts, string(it.Node().Data))
		}
		if len(parts) < 2 || parts[0] != "host" || slices.Contains(order, parts[1]) {
			continue
		}
		order = append(order, parts[1])
	}
	if err := p.Error(); err != nil {
		return nil, err
	}
	return order, nil
}

const header = Marker + `. Do not edit: shoal rewrites this file.
# containerd tries the shoal node first, then any hosts that were configured
# before shoal, then the server. The previous file, if there was one, is kept
# beside this one as hosts.toml` + BackupSuffix + ` and is restored on removal.
`

// render builds shoal's hosts.toml for registry reg, keeping existing's
// server and hosts (nil when there was no file).
func render(cfg Config, reg string, existing *hostsFile) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString(header)

	root := map[string]any{}
	var hosts []namedHost
	if existing != nil {
		for k, v := range existing.root {
			root[k] = v
		}
		hosts = existing.hosts
	}
	if s, ok := root["server"].(string); !ok || s == "" {
		root["server"] = Upstream(reg)
	}
	fmt.Fprintf(&buf, "server = %s\n", quote(root["server"].(string)))
	delete(root, "server")
	if err := emitBody(&buf, nil, root); err != nil {
		return nil, err
	}

	caps := `"pull"`
	if cfg.ResolveTags {
		caps = `"pull", "resolve"`
	}
	fmt.Fprintf(&buf, "\n[host.%s]\ncapabilities = [%s]\n", quote(cfg.MirrorURL), caps)
	if cfg.DialTimeout > 0 {
		fmt.Fprintf(&buf, "dial_timeout = %s\n", quote(cfg.DialTimeout.String()))
	}

	mirror := strings.TrimSuffix(cfg.MirrorURL, "/")
	for _, h := range hosts {
		if strings.TrimSuffix(h.name, "/") == mirror {
			continue
		}
		buf.WriteString("\n")
		if err := emitTable(&buf, []string{"host", h.name}, h.cfg); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// emitTable writes the header [path] and then m.
func emitTable(buf *bytes.Buffer, path []string, m map[string]any) error {
	fmt.Fprintf(buf, "[%s]\n", joinKey(path))
	return emitBody(buf, path, m)
}

// emitBody writes m's plain keys, then its sub-tables and arrays of tables
// under path, all sorted by key so that the output is deterministic.
func emitBody(buf *bytes.Buffer, path []string, m map[string]any) error {
	plain := map[string]any{}
	var tables, arrays []string
	for k, v := range m {
		switch v := v.(type) {
		case map[string]any:
			tables = append(tables, k)
		case []any:
			if len(v) > 0 && allTables(v) {
				arrays = append(arrays, k)
			} else {
				plain[k] = v
			}
		default:
			plain[k] = v
		}
	}
	if len(plain) > 0 {
		b, err := toml.Marshal(plain)
		if err != nil {
			return fmt.Errorf("encode %s: %w", joinKey(path), err)
		}
		buf.Write(b)
	}
	slices.Sort(tables)
	for _, k := range tables {
		if err := emitTable(buf, append(slices.Clip(path), k), m[k].(map[string]any)); err != nil {
			return err
		}
	}
	slices.Sort(arrays)
	for _, k := range arrays {
		p := append(slices.Clip(path), k)
		for _, el := range m[k].([]any) {
			fmt.Fprintf(buf, "[[%s]]\n", joinKey(p))
			if err := emitBody(buf, p, el.(map[string]any)); err != nil {
				return err
			}
		}
	}
	return nil
}

func allTables(a []any) bool {
	for _, v := range a {
		if _, ok := v.(map[string]any); !ok {
			return false
		}
	}
	return true
}

func joinKey(path []string) string {
	parts := make([]string, len(path))
	for i, p := range path {
		parts[i] = quoteKey(p)
	}
	return strings.Join(parts, ".")
}

// quoteKey returns k as a bare key when it may be one, else quoted.
func quoteKey(k string) string {
	if k == "" {
		return `""`
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return quote(k)
		}
	}
	return k
}

// quote returns s as a TOML basic string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
