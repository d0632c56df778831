"""A naive socket-activation server: a blocking accept() loop on fd 3, as written for systemd.

    herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/naive_accept.py

systemd passes listening sockets in blocking mode; herd passes them O_NONBLOCK (the flag is on
the socket shared with every worker). Here accept() then raises BlockingIOError (EAGAIN) as soon
as no connection is waiting, and this server dies. bench/compat.py records it (issue #11 item 6).
The fix in the app: select()/poll() before accept() and ignore BlockingIOError (see
examples/python/server.py), or use a server library that does.
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
