package hub

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// QuietContext returns a context that hands distribution a logger writing to
// io.Discard. distribution looks its logger up in the context under an
// unexported key type of its internal dcontext package and falls back to
// logrus' process-wide logger, which would print every request (and every
// 404 during a push). Answering that key here keeps the hub silent without
// touching global logrus state.
func QuietContext(parent context.Context) context.Context {
	l := logrus.New()
	l.SetOutput(io.Discard)
	l.SetLevel(logrus.PanicLevel)
	return &quiet{Context: parent, entry: logrus.NewEntry(l)}
}

type quiet struct {
	context.Context
	entry *logrus.Entry
}

// Value answers distribution's logger key with the discarding logger.
func (q *quiet) Value(key any) any {
	if t := reflect.TypeOf(key); t != nil && t.Name() == "loggerKey" &&
		strings.HasSuffix(t.PkgPath(), "/internal/dcontext") {
		return q.entry
	}
	return q.Context.Value(key)
}

// serve starts an httptest server on 127.0.0.1, or on addr when it is set,
// whose requests carry ctx's values (and so its quiet logger).
func serve(t testing.TB, ctx context.Context, h http.Handler, addr string) *httptest.Server {
	t.Helper()
	s := httptest.NewUnstartedServer(h)
	if addr != "" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("hub listen %s: %v", addr, err)
		}
		s.Listener.Close()
		s.Listener = l
	}
	s.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	s.Start()
	return s
}
