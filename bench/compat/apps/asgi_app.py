"""An ASGI app for uvicorn under herd:

    herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- uvicorn --fd 3 asgi_app:app
"""
import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"pid": os.getpid(), "instance": os.environ.get("HERD_INSTANCE"),
                       "server": "uvicorn"}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
