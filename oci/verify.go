package oci

import (
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
)

// ErrDigestMismatch is returned by a VerifyingReader whose content does not
// hash to the expected digest, or whose length differs from the expected size.
var ErrDigestMismatch = errors.New("content does not match digest")

// VerifyingReader passes bytes through and, at EOF, checks them against a
// digest and size. On a mismatch the final Read returns ErrDigestMismatch
// instead of io.EOF, so no caller can mistake bad bytes for a complete copy.
type VerifyingReader struct {
	r        io.Reader
	want     digest.Digest
	size     int64 // -1 when unknown
	n        int64
	verifier digest.Verifier
	err      error
}

// NewVerifyingReader wraps r. size may be -1 when unknown.
func NewVerifyingReader(r io.Reader, want digest.Digest, size int64) (*VerifyingReader, error) {
	if err := want.Validate(); err != nil {
		return nil, fmt.Errorf("verify %q: %w", want, err)
	}
	return &VerifyingReader{r: r, want: want, size: size, verifier: want.Verifier()}, nil
}

// Read implements io.Reader.
func (v *VerifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.n += int64(n)
		_, _ = v.verifier.Write(p[:n])
		if v.size >= 0 && v.n > v.size {
			v.err = fmt.Errorf("%w: %s: more than %d bytes", ErrDigestMismatch, v.want, v.size)
			return n, v.err
		}
	}
	if errors.Is(err, io.EOF) {
		switch {
		case v.size >= 0 && v.n != v.size:
			v.err = fmt.Errorf("%w: %s: got %d bytes, want %d", ErrDigestMismatch, v.want, v.n, v.size)
		case !v.verifier.Verified():
			v.err = fmt.Errorf("%w: %s", ErrDigestMismatch, v.want)
		default:
			v.err = io.EOF
		}
		return n, v.err
	}
	if err != nil {
		v.err = err
	}
	return n, err
}

// N returns the number of bytes read so far.
func (v *VerifyingReader) N() int64 { return v.n }
