package oci

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestParseRange(t *testing.T) {
	tests := []struct {
		header string
		size   int64
		want   ByteRange
		ok     bool
		bad    bool
	}{
		{header: "", size: 10},
		{header: "bytes=0-4", size: 10, want: ByteRange{0, 4}, ok: true},
		{header: "bytes=5-", size: 10, want: ByteRange{5, 9}, ok: true},
		{header: "bytes=5-100", size: 10, want: ByteRange{5, 9}, ok: true},
		{header: "bytes=-3", size: 10, want: ByteRange{7, 9}, ok: true},
		{header: "bytes=-30", size: 10, want: ByteRange{0, 9}, ok: true},
		{header: "bytes=10-", size: 10, bad: true},
		{header: "bytes=100-200", size: 10, bad: true},
		{header: "bytes=5-4", size: 10, bad: true},
		{header: "bytes=0-1,3-4", size: 10, bad: true},
		{header: "items=0-1", size: 10, bad: true},
		{header: "bytes=x-1", size: 10, bad: true},
		{header: "bytes=-0", size: 10, bad: true},
		{header: "bytes=0-0", size: 0, bad: true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q/%d", tt.header, tt.size), func(t *testing.T) {
			got, ok, err := ParseRange(tt.header, tt.size)
			if tt.bad {
				var oe *Error
				if !errors.As(err, &oe) || oe.Status != http.StatusRequestedRangeNotSatisfiable {
					t.Fatalf("want 416, got %v", err)
				}
				if cr := oe.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes */%d", tt.size) {
					t.Fatalf("Content-Range %q", cr)
				}
				return
			}
			if err != nil || ok != tt.ok || got != tt.want {
				t.Fatalf("got %+v %v %v, want %+v %v", got, ok, err, tt.want, tt.ok)
			}
		})
	}
}

func TestErrorWrite(t *testing.T) {
	rec := httptest.NewRecorder()
	e := Errorf(404, CodeBlobUnknown, "no such blob").Wrap(errors.New("secret internal detail"))
	e.Write(rec, httptest.NewRequest("GET", "/", nil))
	if rec.Code != 404 {
		t.Fatalf("status %d", rec.Code)
	}
	var env struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil {
		t.Fatal(err)
	}
	if len(env.Errors) != 1 || env.Errors[0].Code != "BLOB_UNKNOWN" || env.Errors[0].Message != "no such blob" {
		t.Fatalf("body %s", rec.Body)
	}
	if bytes.Contains(rec.Body.Bytes(), []byte("secret")) {
		t.Fatal("cause leaked to the client")
	}

	head := httptest.NewRecorder()
	e.Write(head, httptest.NewRequest("HEAD", "/", nil))
	if head.Code != 404 || head.Body.Len() != 0 {
		t.Fatalf("HEAD: %d %q", head.Code, head.Body)
	}
}

func TestWriteErrorHidesPlainErrors(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteError(rec, httptest.NewRequest("GET", "/", nil), fmt.Errorf("dial https://user:hunter2@upstream: refused"))
	if rec.Code != 500 || bytes.Contains(rec.Body.Bytes(), []byte("hunter2")) {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	rec = httptest.NewRecorder()
	WriteError(rec, httptest.NewRequest("GET", "/", nil), fmt.Errorf("wrapped: %w", ErrManifestUnknown))
	if rec.Code != 404 {
		t.Fatalf("wrapped *Error lost its status: %d", rec.Code)
	}
}

func TestVerifyingReader(t *testing.T) {
	data := []byte("hello, shoal")
	d := digest.FromBytes(data)
	tests := []struct {
		name    string
		data    []byte
		size    int64
		wantErr bool
	}{
		{"match", data, int64(len(data)), false},
		{"match unknown size", data, -1, false},
		{"wrong bytes", []byte("hello, sHoal"), int64(len(data)), true},
		{"short", data[:5], int64(len(data)), true},
		{"long", append(append([]byte{}, data...), 'x'), int64(len(data)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := NewVerifyingReader(bytes.NewReader(tt.data), d, tt.size)
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.ReadAll(v)
			if tt.wantErr != errors.Is(err, ErrDigestMismatch) || (!tt.wantErr && err != nil) {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
		})
	}
	if _, err := NewVerifyingReader(bytes.NewReader(nil), "sha256:nope", 0); err == nil {
		t.Fatal("invalid digest accepted")
	}
}

func TestSniffManifestMediaType(t *testing.T) {
	tests := map[string]string{
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`: "application/vnd.oci.image.index.v1+json",
		`{"schemaVersion":2,"config":{},"layers":[]}`:                                              "application/vnd.oci.image.manifest.v1+json",
		`{"schemaVersion":2,"manifests":[]}`:                                                       "application/vnd.oci.image.index.v1+json",
		`{"schemaVersion":2,"mediaType":"text/html"}`:                                              "",
		"\x1f\x8b\x08binary":       "",
		`{"architecture":"amd64"}`: "",
	}
	for in, want := range tests {
		if got := SniffManifestMediaType([]byte(in)); got != want {
			t.Errorf("%q: got %q want %q", in, got, want)
		}
	}
}
