"""A naive socket-activation server: a blocking accept() loop on fd 3, as written for systemd.

    herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/naive_accept.py

systemd passes listening sockets in blocking mode, and so does herd: accept() waits for the next
connection. (Until issue #11 item 6 was fixed herd passed them O_NONBLOCK, and this loop died
with BlockingIOError.) The flag is on the socket shared with every worker: if one worker of an
app makes it non-blocking, every worker's accept() can raise EAGAIN; a server that wants its
SIGTERM noticed while idle waits with select()/poll() first (see examples/python/server.py).
"""
import json
import os
import socket

sock = socket.socket(fileno=3)
body = json.dumps({"pid": os.getpid(), "instance": os.environ.get("HERD_INSTANCE"),
                   "server": "naive"}).encode()
while True:
    conn, _ = sock.accept()
    with conn:
        conn.settimeout(5)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
