package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/shoal-oci/shoal/oci"
)

// rawGet sends a blob GET to a peer over a connection of its own and returns
// the response with a body that can hand its bytes to the client with
// splice(2): after the few bytes already buffered, the rest moves from the
// peer's socket to the client's socket inside the kernel. net/http's client
// hides its connection, so it cannot do this.
func rawGet(ctx context.Context, dialer *net.Dialer, req *http.Request, idle time.Duration) (*http.Response, error) {
	if req.URL.Scheme != "http" {
		return nil, fmt.Errorf("raw peer fetch needs http, not %q", req.URL.Scheme)
	}
	host := req.URL.Host
	if req.URL.Port() == "" {
		host = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	conn, err := dialer.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", host, err)
	}
	// The request's context ends the connection, whatever is blocked on it.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	req.Close = true
	if err := conn.SetWriteDeadline(time.Now().Add(10 * time.Second)); err == nil {
		defer conn.SetWriteDeadline(time.Time{})
	}
	if err := req.Write(conn); err != nil {
		stop()
		conn.Close()
		return nil, fmt.Errorf("send request to %s: %w", host, err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	// The response head is bounded: a peer cannot make this node buffer
	// headers without end.
	lim := &headLimit{r: conn, left: maxPeerHead}
	br := bufio.NewReaderSize(lim, 32<<10)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		stop()
		conn.Close()
		return nil, fmt.Errorf("read response from %s: %w", host, err)
	}
	lim.left = -1 // the body is not limited here
	_ = conn.SetReadDeadline(time.Time{})
	if resp.ContentLength < 0 || len(resp.TransferEncoding) > 0 || req.Method == http.MethodHead {
		// Not a plain sized body: let net/http's reader handle it.
		resp.Body = &closeBoth{ReadCloser: oci.NewIdleReader(resp.Body, idle), conn: conn, stop: stop}
		return resp, nil
	}
	resp.Body = &rawBody{br: br, conn: conn.(*net.TCPConn), left: resp.ContentLength, stop: stop, idle: idle}
	return resp, nil
}

// maxPeerHead bounds a peer's status line and headers (plus what the
// buffered reader reads ahead of the body).
const maxPeerHead = 64<<10 + 32<<10

// errHeadTooLarge is returned when a peer's response head exceeds maxPeerHead.
var errHeadTooLarge = errors.New("peer response headers too large")

// headLimit reads at most left bytes, then fails; left < 0 means unlimited.
type headLimit struct {
	r    io.Reader
	left int64
}

func (l *headLimit) Read(p []byte) (int, error) {
	if l.left < 0 {
		return l.r.Read(p)
	}
	if l.left == 0 {
		return 0, errHeadTooLarge
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

type closeBoth struct {
	io.ReadCloser
	conn net.Conn
	stop func() bool
}

func (c *closeBoth) Close() error {
	c.stop()
	c.ReadCloser.Close()
	return c.conn.Close()
}

// rawBody is a response body read straight off the peer's connection.
type rawBody struct {
	br   *bufio.Reader
	conn *net.TCPConn
	left int64
	stop func() bool
	idle time.Duration // a read that waits longer fails with oci.ErrStalled
}

// spliceChunk is how much WriteTo moves per read deadline: the peer must
// deliver each chunk within the idle timeout.
const spliceChunk = 1 << 20

// deadline arms the idle timeout for the next read.
func (b *rawBody) deadline() {
	if b.idle > 0 {
		_ = b.conn.SetReadDeadline(time.Now().Add(b.idle))
	}
}

// stalled maps a read deadline to oci.ErrStalled.
func stalled(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: %v", oci.ErrStalled, err)
	}
	return err
}

func (b *rawBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	var n int
	var err error
	if b.br.Buffered() > 0 {
		n, err = b.br.Read(p)
	} else {
		b.deadline()
		n, err = b.conn.Read(p)
	}
	b.left -= int64(n)
	if err == io.EOF && b.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, stalled(err)
}

// WriteTo copies the rest of the body to w. When w is an http.ResponseWriter
// on a TCP connection, the bytes after the buffered ones move by splice.
func (b *rawBody) WriteTo(w io.Writer) (int64, error) {
	var total int64
	if k := int64(b.br.Buffered()); k > 0 && b.left > 0 {
		n, err := io.CopyN(w, b.br, min(k, b.left))
		total += n
		b.left -= n
		if err != nil {
			return total, err
		}
	}
	for b.left > 0 {
		b.deadline()
		n, err := io.CopyN(w, b.conn, min(b.left, spliceChunk))
		total += n
		b.left -= n
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return total, stalled(err)
		}
	}
	return total, nil
}

func (b *rawBody) Close() error {
	b.stop()
	return b.conn.Close()
}
