package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Error is an error answer from an upstream registry. It never carries
// credentials or Authorization values.
type Error struct {
	// Upstream is the registry host, Op what was asked (e.g. "GET manifest
	// library/alpine:3.20").
	Upstream, Op string
	Status       int
	// Code is the first OCI error code of the body, e.g. MANIFEST_UNKNOWN.
	Code    string
	Message string
	// RetryAfter is the upstream's Retry-After, if any.
	RetryAfter time.Duration
}

// Error implements error.
func (e *Error) Error() string {
	s := fmt.Sprintf("upstream %s: %s: %d", e.Upstream, e.Op, e.Status)
	if e.Code != "" {
		s += " " + e.Code
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.RetryAfter > 0 {
		s += fmt.Sprintf(" (retry after %s)", e.RetryAfter)
	}
	return s
}

const maxErrorBody = 64 << 10

// responseError builds an *Error from a non-success response and closes its body.
func responseError(upstream, op string, resp *http.Response) *Error {
	defer resp.Body.Close()
	e := &Error{Upstream: upstream, Op: op, Status: resp.StatusCode}
	e.RetryAfter, _ = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var env struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &env) == nil && len(env.Errors) > 0 {
		e.Code, e.Message = env.Errors[0].Code, truncate(env.Errors[0].Message, 256)
	}
	if e.Message == "" {
		e.Message = http.StatusText(resp.StatusCode)
	}
	return e
}

// transportError turns a ping or token error from go-containerregistry into
// an *Error when it is an HTTP answer, so only the status, code and message
// survive (never the request).
func transportError(upstream, op string, err error) error {
	var te *transport.Error
	if errors.As(err, &te) {
		e := &Error{Upstream: upstream, Op: op, Status: te.StatusCode, Message: http.StatusText(te.StatusCode)}
		if len(te.Errors) > 0 {
			e.Code, e.Message = string(te.Errors[0].Code), truncate(te.Errors[0].Message, 256)
		}
		return e
	}
	return fmt.Errorf("upstream %s: %s: %w", upstream, op, err)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// IsNotFound reports whether the upstream does not have the thing asked for.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// IsRateLimited reports whether the upstream refused with 429 / TOOMANYREQUESTS.
func IsRateLimited(err error) bool {
	var e *Error
	return errors.As(err, &e) && (e.Status == http.StatusTooManyRequests || e.Code == "TOOMANYREQUESTS")
}

// IsUnavailable reports whether the upstream could not answer: a 5xx, a
// refused or reset connection, a DNS failure, or a timeout.
func IsUnavailable(err error) bool {
	if err == nil {
		return false
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Status >= 500 || e.Status == http.StatusRequestTimeout
	}
	if errors.Is(err, context.Canceled) {
		return false // the caller gave up; the upstream may be fine
	}
	var ne net.Error
	var op *net.OpError
	var dns *net.DNSError
	return errors.As(err, &op) || errors.As(err, &dns) ||
		(errors.As(err, &ne) && ne.Timeout()) ||
		errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

// parseRetryAfter parses delay seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}
