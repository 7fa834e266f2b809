package oci

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// ByteRange is an inclusive byte range resolved against a known size.
type ByteRange struct {
	Start, End int64 // inclusive
}

// Length is the number of bytes in the range.
func (b ByteRange) Length() int64 { return b.End - b.Start + 1 }

// ContentRange renders the Content-Range header value for a total size.
func (b ByteRange) ContentRange(size int64) string {
	return fmt.Sprintf("bytes %d-%d/%d", b.Start, b.End, size)
}

// ParseRange parses a single-range "bytes=" header against size. ok is false
// when the header is absent. A syntactically valid range that cannot be
// satisfied yields a 416 *Error carrying Content-Range: bytes */size.
// Multi-range requests are refused with 416 as well: registries serve one range.
func ParseRange(header string, size int64) (br ByteRange, ok bool, err error) {
	if header == "" {
		return ByteRange{}, false, nil
	}
	bad := func(msg string) (ByteRange, bool, error) {
		return ByteRange{}, false, &Error{
			Status:  http.StatusRequestedRangeNotSatisfiable,
			Code:    CodeRangeNotSatisfiable,
			Message: msg,
			Header:  http.Header{"Content-Range": {fmt.Sprintf("bytes */%d", size)}},
		}
	}
	spec, found := strings.CutPrefix(header, "bytes=")
	if !found || len(header) > 128 {
		return bad("only a single bytes= range is supported")
	}
	if strings.Contains(spec, ",") {
		return bad("multiple ranges are not supported")
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return bad("malformed range")
	}
	switch {
	case first == "": // suffix: last N bytes
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n <= 0 {
			return bad("malformed suffix range")
		}
		if size == 0 {
			return bad("range on empty content")
		}
		if n > size {
			n = size
		}
		return ByteRange{Start: size - n, End: size - 1}, true, nil
	default:
		s, err := strconv.ParseInt(first, 10, 64)
		if err != nil || s < 0 {
			return bad("malformed range start")
		}
		if s >= size {
			return bad("range start past the end of the content")
		}
		e := size - 1
		if last != "" {
			e, err = strconv.ParseInt(last, 10, 64)
			if err != nil || e < s {
				return bad("malformed range end")
			}
			if e >= size {
				e = size - 1
			}
		}
		return ByteRange{Start: s, End: e}, true, nil
	}
}
