// server.go - Go payload for miehisto (standard library only, Go >= 1.19).
//
// Same protocol and MHLOG lines as the C payloads, log name "go". Go does
// not call libc's listen(): socket/bind/listen are raw syscalls issued by
// the Go runtime (package syscall), so an LD_PRELOAD wrapper never sees
// them, and a CGO_ENABLED=0 build is a static binary anyway. The Go runtime
// also runs several threads before main() starts.
//
// socket/bind/listen are done step by step with package syscall so that
// "bound" and "listen" can be logged between them; the listening fd is
// then handed to package net and served one goroutine per connection.
//
// Usage: server [--port N]   (else env PORT, else 8080)
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

const name = "go"

var requests int64

// logf writes one "MHLOG go ..." line with a single write(2) (os.Stdout is
// unbuffered).
func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stdout, "MHLOG "+name+" "+format+"\n", args...)
}

func fatal(what string, err error) {
	logf("fatal %s failed errno=%d (%v)", what, errnoOf(err), err)
	os.Exit(3)
}

func errnoOf(err error) int {
	if e, ok := err.(syscall.Errno); ok {
		return int(e)
	}
	return -1
}

func defaultPort() int {
	if s := os.Getenv("PORT"); s != "" {
		if p, err := strconv.Atoi(s); err == nil {
			return p
		}
	}
	return 8080
}

func handle(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for { // read up to the blank line that ends the headers
		line, err := r.ReadString('\n')
		if err != nil || strings.TrimRight(line, "\r\n") == "" {
			break
		}
	}
	n := atomic.AddInt64(&requests, 1)
	logf("request n=%d", n)
	body := fmt.Sprintf("payload=%s pid=%d requests=%d\n", name, os.Getpid(), n)
	fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"+
		"Content-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

func main() {
	port := flag.Int("port", defaultPort(), "TCP port on 127.0.0.1")
	flag.Parse()

	// As PID 1 of a PID namespace, signals left at SIG_DFL are ignored:
	// handle SIGTERM/SIGINT ourselves.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := (<-sigs).(syscall.Signal)
		logf("exit signal=%d", int(s))
		os.Exit(128 + int(s))
	}()

	logf("start pid=%d ppid=%d", os.Getpid(), os.Getppid())

	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		fatal("socket", err)
	}
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		fatal("setsockopt", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: *port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		fatal("bind", err)
	}
	bound := *port
	if sa, err := syscall.Getsockname(fd); err == nil {
		if in4, ok := sa.(*syscall.SockaddrInet4); ok {
			bound = in4.Port
		}
	}
	logf("bound port=%d fd=%d", bound, fd)

	if err := syscall.Listen(fd, 64); err != nil {
		logf("listen ret=-1 errno=%d", errnoOf(err))
		logf("fatal listen failed")
		os.Exit(3)
	}
	logf("listen ret=0 errno=0")

	f := os.NewFile(uintptr(fd), "listener")
	ln, err := net.FileListener(f) // dups fd; the dup is what we serve on
	if err != nil {
		fatal("filelistener", err)
	}
	f.Close()

	logf("serving")
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handle(c)
	}
}
