"""A WSGI app for gunicorn under herd (socket activation: gunicorn reads LISTEN_FDS itself):

    herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- gunicorn -w 1 wsgi_app:app
"""
import json
import os


def app(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "instance": os.environ.get("HERD_INSTANCE"),
                       "server": "gunicorn"}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
