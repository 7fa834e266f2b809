package dht

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
)

// identityFile is the name of the file in Config.DataDir that holds the
// node's libp2p private key (protobuf-encoded, as crypto.MarshalPrivateKey
// writes it).
const identityFile = "identity.key"

// loadIdentity returns the private key stored in dir, creating it (mode 0600)
// on first start. An empty dir yields a fresh key that is not saved.
func loadIdentity(dir string) (crypto.PrivKey, error) {
	if dir == "" {
		sk, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate identity: %w", err)
		}
		return sk, nil
	}
	path := filepath.Join(dir, identityFile)
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		sk, err := crypto.UnmarshalPrivateKey(data)
		if err != nil {
			return nil, fmt.Errorf("read identity %s: %w", path, err)
		}
		return sk, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read identity: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	sk, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate identity: %w", err)
	}
	data, err = crypto.MarshalPrivateKey(sk)
	if err != nil {
		return nil, fmt.Errorf("encode identity: %w", err)
	}
	// Write to a temporary file and rename, so a crash never leaves a
	// truncated key behind.
	tmp, err := os.CreateTemp(dir, identityFile+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("write identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write identity: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write identity: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("write identity: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, fmt.Errorf("write identity: %w", err)
	}
	return sk, nil
}
