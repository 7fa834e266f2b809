// Package oci holds the distribution-spec primitives that both tiers share:
// route parsing, the error envelope, Range parsing, media types and a
// digest-verifying reader. It does no network and no storage.
package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// ErrorCode is a distribution-spec error code such as MANIFEST_UNKNOWN.
type ErrorCode string

// Error codes from the distribution spec, plus the Docker Hub rate-limit code.
const (
	CodeBlobUnknown         ErrorCode = "BLOB_UNKNOWN"
	CodeManifestUnknown     ErrorCode = "MANIFEST_UNKNOWN"
	CodeManifestInvalid     ErrorCode = "MANIFEST_INVALID"
	CodeNameInvalid         ErrorCode = "NAME_INVALID"
	CodeNameUnknown         ErrorCode = "NAME_UNKNOWN"
	CodeDigestInvalid       ErrorCode = "DIGEST_INVALID"
	CodeUnsupported         ErrorCode = "UNSUPPORTED"
	CodeUnauthorized        ErrorCode = "UNAUTHORIZED"
	CodeDenied              ErrorCode = "DENIED"
	CodeTooManyRequests     ErrorCode = "TOOMANYREQUESTS"
	CodeRangeNotSatisfiable ErrorCode = "RANGE_INVALID"
	CodeUnavailable         ErrorCode = "UNAVAILABLE"
)

// Error is an HTTP status plus an OCI error code and message. Handlers return
// it; one place renders it with Write.
type Error struct {
	Status  int
	Code    ErrorCode
	Message string
	// Header holds extra response headers, e.g. Retry-After or Content-Range.
	Header http.Header
	// Err is the underlying cause. It is never rendered to the client.
	Err error
}

// Errorf builds an *Error with a formatted message.
func Errorf(status int, code ErrorCode, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Error implements error.
func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s (%d): %s: %v", e.Code, e.Status, e.Message, e.Err)
	}
	return fmt.Sprintf("%s (%d): %s", e.Code, e.Status, e.Message)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Wrap returns a copy of e with cause err.
func (e *Error) Wrap(err error) *Error {
	c := *e
	c.Err = err
	return &c
}

type envelope struct {
	Errors []envelopeError `json:"errors"`
}

type envelopeError struct {
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`
	Detail  any       `json:"detail,omitempty"`
}

// Write renders e as the OCI error envelope. For HEAD requests only the status
// and headers are written, as the spec requires.
func (e *Error) Write(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	for k, vs := range e.Header {
		h[k] = vs
	}
	h.Del("Content-Length")
	h.Del("Docker-Content-Digest")
	h.Del("Content-Encoding")
	body, _ := json.Marshal(envelope{Errors: []envelopeError{{Code: e.Code, Message: e.Message}}})
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	if r != nil && r.Method == http.MethodHead {
		w.WriteHeader(e.Status)
		return
	}
	h.Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}

// WriteError renders any error. An *Error (anywhere in the chain) keeps its
// status and code; anything else is a 500 with a generic message, so internal
// details such as upstream URLs or credentials never reach the client.
func WriteError(w http.ResponseWriter, r *http.Request, err error) {
	var oe *Error
	if errors.As(err, &oe) {
		oe.Write(w, r)
		return
	}
	(&Error{Status: http.StatusInternalServerError, Code: CodeUnavailable, Message: "internal error"}).Write(w, r)
}

// Common errors.
var (
	// ErrBlobUnknown is returned for a blob that no source holds.
	ErrBlobUnknown = &Error{Status: http.StatusNotFound, Code: CodeBlobUnknown, Message: "blob unknown to registry"}
	// ErrManifestUnknown is returned for a manifest that no source holds.
	ErrManifestUnknown = &Error{Status: http.StatusNotFound, Code: CodeManifestUnknown, Message: "manifest unknown"}
	// ErrUnsupported is returned for methods and routes a pull-only mirror does not serve.
	ErrUnsupported = &Error{Status: http.StatusMethodNotAllowed, Code: CodeUnsupported, Message: "this registry mirror is pull-only"}
)
