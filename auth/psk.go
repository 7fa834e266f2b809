package auth

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
)

// PSKHeader is the first line of a libp2p swarm.key file.
const PSKHeader = "/key/swarm/psk/1.0.0/"

// PSKSize is the size in bytes of a libp2p private-network key.
const PSKSize = 32

// LoadPSK reads a libp2p private-network key from path and returns its 32
// bytes, ready for libp2p.PrivateNetwork. It accepts the swarm.key format
// (PSKHeader, then "/base16/" or "/base64/", then the key) and a file that
// holds only the 64 hex characters. Errors never quote the file.
func LoadPSK(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("auth: psk: %w", err)
	}
	key, err := ParsePSK(b)
	if err != nil {
		return nil, fmt.Errorf("auth: psk %s: %w", path, err)
	}
	return key, nil
}

// ParsePSK decodes the contents of a swarm.key file or a bare 64-character
// hex key. See LoadPSK.
func ParsePSK(b []byte) ([]byte, error) {
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, errors.New("unreadable key file")
	}
	var key []byte
	var err error
	switch {
	case len(lines) == 1 && lines[0] != PSKHeader:
		key, err = hex.DecodeString(lines[0])
		if err != nil {
			return nil, errors.New("bare key is not hex")
		}
	case len(lines) == 3 && lines[0] == PSKHeader:
		switch lines[1] {
		case "/base16/":
			key, err = hex.DecodeString(lines[2])
		case "/base64/":
			key, err = base64.StdEncoding.DecodeString(lines[2])
		default:
			return nil, errors.New("unsupported key encoding: want /base16/ or /base64/")
		}
		if err != nil {
			return nil, fmt.Errorf("key is not valid %s", strings.Trim(lines[1], "/"))
		}
	default:
		return nil, fmt.Errorf("not a swarm.key (want %q, an encoding line and the key) nor a bare hex key", PSKHeader)
	}
	if len(key) != PSKSize {
		return nil, fmt.Errorf("key is %d bytes, want %d", len(key), PSKSize)
	}
	return key, nil
}

// GeneratePSK returns a new random key as swarm.key text, base16 encoded.
func GeneratePSK() (string, error) {
	key := make([]byte, PSKSize)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("auth: generate psk: %w", err)
	}
	return PSKHeader + "\n/base16/\n" + hex.EncodeToString(key) + "\n", nil
}
