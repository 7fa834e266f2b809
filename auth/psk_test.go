package auth

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/pnet"
)

const keyHex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

func TestLoadPSK(t *testing.T) {
	want, _ := hex.DecodeString(keyHex)
	b64key := base64.StdEncoding.EncodeToString(want)
	tests := []struct {
		name, content string
		ok            bool
	}{
		{"swarm_key_base16", "/key/swarm/psk/1.0.0/\n/base16/\n" + keyHex + "\n", true},
		{"swarm_key_no_trailing_newline", "/key/swarm/psk/1.0.0/\n/base16/\n" + keyHex, true},
		{"swarm_key_crlf", "/key/swarm/psk/1.0.0/\r\n/base16/\r\n" + keyHex + "\r\n", true},
		{"swarm_key_uppercase_hex", "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.ToUpper(keyHex) + "\n", true},
		{"swarm_key_base64", "/key/swarm/psk/1.0.0/\n/base64/\n" + b64key + "\n", true},
		{"raw_hex", keyHex + "\n", true},
		{"raw_hex_no_newline", keyHex, true},
		{"raw_hex_too_short", keyHex[:62], false},
		{"raw_hex_too_long", keyHex + "00", false},
		{"raw_not_hex", strings.Repeat("zz", 32), false},
		{"unknown_encoding", "/key/swarm/psk/1.0.0/\n/bin/\n" + keyHex + "\n", false},
		{"wrong_header", "/key/swarm/psk/2.0.0/\n/base16/\n" + keyHex + "\n", false},
		{"header_only", "/key/swarm/psk/1.0.0/\n", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "swarm.key")
			if err := os.WriteFile(p, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := LoadPSK(p)
			if !tt.ok {
				if err == nil {
					t.Fatalf("LoadPSK accepted %q", tt.content)
				}
				if strings.Contains(err.Error(), keyHex[:16]) {
					t.Fatalf("error quotes the key: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("key = %x, want %x", got, want)
			}
		})
	}
	if _, err := LoadPSK(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("LoadPSK accepted a missing file")
	}
}

func TestGeneratePSKIsReadByLibp2pAndLoadPSK(t *testing.T) {
	text, err := GeneratePSK()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(text, PSKHeader+"\n/base16/\n") {
		t.Fatalf("GeneratePSK text %q lacks the swarm.key header", text)
	}
	ours, err := ParsePSK([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := pnet.DecodeV1PSK(strings.NewReader(text))
	if err != nil {
		t.Fatalf("libp2p rejects the generated key: %v", err)
	}
	if !bytes.Equal(ours, theirs) || len(ours) != PSKSize {
		t.Fatalf("ParsePSK = %x, libp2p = %x", ours, theirs)
	}
	other, err := GeneratePSK()
	if err != nil {
		t.Fatal(err)
	}
	if other == text {
		t.Fatal("two generated keys are equal")
	}
}
