package hub

import (
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"time"
)

// token is an issued bearer token: the account it stands for ("" for
// anonymous) and the repositories it may pull.
type token struct {
	account string
	repos   map[string]bool
	expires time.Time
}

type tokenResponse struct {
	Token       string `json:"token"`
	AccessToken string `json:"access_token"`
	ExpiresIn   int    `json:"expires_in"`
	IssuedAt    string `json:"issued_at"`
}

// serveToken answers GET /token (basic auth optional) and POST /token
// (OAuth2 password grant), like auth.docker.io.
func (h *Hub) serveToken(w http.ResponseWriter, r *http.Request) {
	h.counts.tokenRequests.Add(1)
	var user, pass string
	var hasCreds bool
	var scopes []string
	switch r.Method {
	case http.MethodGet:
		user, pass, hasCreds = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		if err := r.ParseForm(); err != nil {
			writeTokenError(w, http.StatusBadRequest, "malformed form")
			return
		}
		if gt := r.PostForm.Get("grant_type"); gt != "password" {
			writeTokenError(w, http.StatusBadRequest, "unsupported grant_type "+gt)
			return
		}
		user, pass = r.PostForm.Get("username"), r.PostForm.Get("password")
		hasCreds = true
		scopes = r.PostForm["scope"]
	default:
		w.Header().Set("Allow", "GET, POST")
		writeTokenError(w, http.StatusMethodNotAllowed, "method not allowed")
		return
	}

	acct := ""
	if hasCreds {
		h.mu.Lock()
		h.sawBasic[user] = true
		h.mu.Unlock()
		a, ok := h.cfg.accounts[user]
		if !ok || a.password != pass {
			writeTokenError(w, http.StatusUnauthorized, "incorrect username or password")
			return
		}
		acct = user
	}

	repos := map[string]bool{}
	for _, s := range scopes {
		for _, one := range strings.Fields(s) {
			// repository:<name>:<actions>; the name has no colon in it on
			// Docker Hub, but split from the right to be safe.
			rest, ok := strings.CutPrefix(one, "repository:")
			if !ok {
				continue
			}
			i := strings.LastIndex(rest, ":")
			if i < 0 {
				continue
			}
			for _, act := range strings.Split(rest[i+1:], ",") {
				if act == "pull" || act == "*" {
					repos[rest[:i]] = true
				}
			}
		}
	}

	ttl := h.cfg.tokenTTL
	secs := int(ttl / time.Second)
	if secs < 1 {
		secs = 1
	}
	now := time.Now()
	tok := randomHex(24)
	h.mu.Lock()
	for k, v := range h.tokens {
		if now.After(v.expires) {
			delete(h.tokens, k)
		}
	}
	h.tokens[tok] = token{account: acct, repos: repos, expires: now.Add(ttl)}
	h.mu.Unlock()

	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(tokenResponse{
		Token: tok, AccessToken: tok, ExpiresIn: secs,
		IssuedAt: now.UTC().Format(time.RFC3339),
	})
}

func writeTokenError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"details": msg})
}

// authorize returns the token presented on r, whether it is valid, and
// whether it grants pull on repo ("" for the base route, which any valid
// token may use). It also records basic-auth users seen on registry routes.
func (h *Hub) authorize(r *http.Request, repo string) (token, bool) {
	authz := r.Header.Get("Authorization")
	if user, _, ok := r.BasicAuth(); ok {
		h.mu.Lock()
		h.sawBasic[user] = true
		h.mu.Unlock()
		return token{}, false
	}
	raw, ok := strings.CutPrefix(authz, "Bearer ")
	if !ok {
		return token{}, false
	}
	h.mu.Lock()
	tok, found := h.tokens[raw]
	h.mu.Unlock()
	if !found || time.Now().After(tok.expires) {
		return token{}, false
	}
	if repo != "" && !tok.repos[repo] {
		return token{}, false
	}
	return tok, true
}

// challenge answers 401 with a Docker-Hub-style bearer challenge.
func (h *Hub) challenge(w http.ResponseWriter, r *http.Request, repo, action string) {
	h.counts.unauthorized.Add(1)
	c := `Bearer realm="` + h.realm + `",service="` + Service + `"`
	if repo != "" {
		c += `,scope="repository:` + repo + `:` + action + `"`
	}
	if strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
		c += `,error="insufficient_scope"`
	}
	w.Header().Set("WWW-Authenticate", c)
	writeError(w, r, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
}

// clientIP is the anonymous rate-limit source: the client's IP address.
func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}
