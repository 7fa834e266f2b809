package wire

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

func TestEncodeSplitsAndDecodes(t *testing.T) {
	keys := make([]Hash, MaxKeys+3)
	for i := range keys {
		keys[i] = HashKey(string(rune(i)))
	}
	msgs := Encode(OpRemove, keys)
	if len(msgs) != 2 {
		t.Fatalf("%d messages, want 2", len(msgs))
	}
	var got []Hash
	for _, m := range msgs {
		if len(m) > MaxSize {
			t.Fatalf("message of %d bytes, over MaxSize %d", len(m), MaxSize)
		}
		a, err := Decode(m)
		if err != nil {
			t.Fatal(err)
		}
		if a.Op != OpRemove {
			t.Fatalf("op %d", a.Op)
		}
		got = append(got, a.Keys...)
	}
	if !slices.Equal(got, keys) {
		t.Fatal("keys changed on the way")
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, bad := range [][]byte{
		nil,
		{Version, OpAdd}, // no keys
		append([]byte{9, OpAdd}, make([]byte, 32)...),       // unknown version
		append([]byte{Version, 7}, make([]byte, 32)...),     // unknown op
		append([]byte{Version, OpAdd}, make([]byte, 33)...), // not whole keys
		append([]byte{Version, OpAdd}, make([]byte, 32*(MaxKeys+1))...),
	} {
		if _, err := Decode(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("Decode(% x...) = %v, want ErrMalformed", bad[:min(len(bad), 4)], err)
		}
	}
}

// FuzzDecode: any bytes a peer sends decode or fail cleanly, and what
// decodes encodes back to the same bytes.
func FuzzDecode(f *testing.F) {
	f.Add(Encode(OpAdd, []Hash{HashKey("a"), HashKey("b")})[0])
	f.Add([]byte{Version, OpRemove})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		again := Encode(a.Op, a.Keys)
		if len(again) != 1 || !bytes.Equal(again[0], b) {
			t.Fatalf("decode/encode changed the message")
		}
	})
}
