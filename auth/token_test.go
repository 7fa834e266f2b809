package auth

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
)

const secretToken = "node-to-cache-s3cr3t"

func okHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "ok")
	})
}

func TestTokenMiddleware(t *testing.T) {
	h := NewToken(secretToken).Middleware(okHandler())
	tests := []struct {
		name, method, header string
		want                 int
	}{
		{"right_token_passes", http.MethodGet, "Bearer " + secretToken, http.StatusOK},
		{"scheme_is_case_insensitive", http.MethodGet, "bearer " + secretToken, http.StatusOK},
		{"no_header_is_401", http.MethodGet, "", http.StatusUnauthorized},
		{"wrong_token_is_401", http.MethodGet, "Bearer nope", http.StatusUnauthorized},
		{"token_prefix_is_401", http.MethodGet, "Bearer " + secretToken[:5], http.StatusUnauthorized},
		{"token_with_suffix_is_401", http.MethodGet, "Bearer " + secretToken + "x", http.StatusUnauthorized},
		{"basic_scheme_is_401", http.MethodGet, "Basic " + secretToken, http.StatusUnauthorized},
		{"bare_token_is_401", http.MethodGet, secretToken, http.StatusUnauthorized},
		{"head_without_token_is_401", http.MethodHead, "", http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(tt.method, "/v2/", nil)
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tt.want {
				t.Fatalf("status = %d, want %d", w.Code, tt.want)
			}
			if tt.want != http.StatusUnauthorized {
				return
			}
			if w.Header().Get("Www-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
			if tt.method == http.MethodHead {
				if w.Body.Len() != 0 {
					t.Errorf("HEAD 401 has a body: %q", w.Body)
				}
				return
			}
			var env struct {
				Errors []struct{ Code, Message string } `json:"errors"`
			}
			if err := json.Unmarshal(w.Body.Bytes(), &env); err != nil {
				t.Fatalf("401 body is not an OCI error: %v: %q", err, w.Body)
			}
			if len(env.Errors) != 1 || env.Errors[0].Code != "UNAUTHORIZED" {
				t.Fatalf("401 body = %+v", env)
			}
		})
	}
}

func TestEmptyTokenDisablesMiddleware(t *testing.T) {
	for name, tok := range map[string]Token{"zero": {}, "blank": NewToken("  \n")} {
		t.Run(name, func(t *testing.T) {
			if !tok.Empty() {
				t.Fatal("token is not empty")
			}
			w := httptest.NewRecorder()
			tok.Middleware(okHandler()).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/v2/", nil))
			if w.Code != http.StatusOK {
				t.Fatalf("status = %d, want 200 with auth off", w.Code)
			}
			if rt := tok.RoundTripper(http.DefaultTransport); rt != http.DefaultTransport {
				t.Fatalf("empty token wrapped the transport: %T", rt)
			}
		})
	}
}

func TestTokenRoundTripperAuthenticates(t *testing.T) {
	tok := NewToken(secretToken)
	srv := httptest.NewServer(tok.Middleware(okHandler()))
	t.Cleanup(srv.Close)

	req, err := http.NewRequest(http.MethodGet, srv.URL+"/v2/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: tok.RoundTripper(nil)}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("with RoundTripper: status %d, want 200", resp.StatusCode)
	}
	if req.Header.Get("Authorization") != "" {
		t.Fatal("RoundTripper modified the caller's request")
	}

	resp, err = srv.Client().Get(srv.URL + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without RoundTripper: status %d, want 401", resp.StatusCode)
	}
	resp, err = (&http.Client{Transport: NewToken("other").RoundTripper(nil)}).Get(srv.URL + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("with a wrong token: status %d, want 401", resp.StatusCode)
	}
}

func TestLoadToken(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Run("trailing_newline_is_trimmed", func(t *testing.T) {
		tok, err := LoadToken(write("tok", secretToken+"\n"))
		if err != nil {
			t.Fatal(err)
		}
		r := httptest.NewRequest(http.MethodGet, "/v2/", nil)
		r.Header.Set("Authorization", "Bearer "+secretToken)
		w := httptest.NewRecorder()
		tok.Middleware(okHandler()).ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			t.Fatalf("status %d, want 200", w.Code)
		}
	})
	t.Run("empty_path_is_empty_token", func(t *testing.T) {
		tok, err := LoadToken("")
		if err != nil || !tok.Empty() {
			t.Fatalf("LoadToken(\"\") = empty:%v, %v", tok.Empty(), err)
		}
	})
	t.Run("empty_file_is_empty_token", func(t *testing.T) {
		tok, err := LoadToken(write("empty", "\n"))
		if err != nil || !tok.Empty() {
			t.Fatalf("empty file: empty:%v, %v", tok.Empty(), err)
		}
	})
	t.Run("inner_white_space_is_rejected", func(t *testing.T) {
		if _, err := LoadToken(write("bad", "two words")); err == nil {
			t.Fatal("accepted a token with a space")
		}
	})
	t.Run("missing_file_is_an_error", func(t *testing.T) {
		if _, err := LoadToken(filepath.Join(dir, "missing")); err == nil {
			t.Fatal("accepted a missing file")
		}
	})
}
