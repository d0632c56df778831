// Go net/http on herd's socket: go build -o gohttp ./gohttp && herd run -l 127.0.0.1:3000 -i 2 ./gohttp/gohttp
//
// herd passes the listening socket at fd 3 (LISTEN_FDS=1). It is O_NONBLOCK; Go's runtime
// poller handles that. On SIGTERM, Shutdown stops accepting, lets requests in flight finish
// and closes idle keep-alive connections, then the process exits.
//
// Shutdown closing an idle keep-alive connection races with a client that is sending its next
// request on it at that moment: that request fails (a reload under keep-alive load loses a few).
// DRAIN_MS=1000 (herd run -e DRAIN_MS=1000 ...) first answers every request with
// "Connection: close" for that long, so clients move to new connections (the new workers), and
// only then calls Shutdown.
package main

import (
	"context"
	"encoding/json"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if os.Getenv("LISTEN_PID") != itoa(os.Getpid()) || os.Getenv("LISTEN_FDS") == "" {
		log.Fatal("gohttp: run me under herd (or systemd) with a socket at fd 3")
	}
	ln, err := net.FileListener(os.NewFile(3, "herd-listener"))
	if err != nil {
		log.Fatal(err)
	}
	me := map[string]any{"pid": os.Getpid(), "instance": os.Getenv("HERD_INSTANCE"), "server": "go"}
	drainMs, _ := strconv.Atoi(os.Getenv("DRAIN_MS"))
	var draining atomic.Bool
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close")
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(me)
	})}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		<-stop
		if drainMs > 0 {
			draining.Store(true)
			time.Sleep(time.Duration(drainMs) * time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
	<-drained // Serve returns at once on Shutdown; the drain goes on until Shutdown returns
}

func itoa(n int) string {
	b := []byte{}
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}
