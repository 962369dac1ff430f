"""A real HTTP server on 127.0.0.1, started by the fetch tests: the Hugging Face hub's file
endpoint (``/ORG/NAME/resolve/REVISION/FILE``, what ``huggingface_hub`` asks for once
``HF_ENDPOINT`` points here) and plain files for direct URLs.

It answers as the hub does where the client looks: ``X-Repo-Commit``, an ``ETag`` and the
size on ``HEAD``; ``Range`` requests with ``206``; ``404`` with ``X-Error-Code``. Tests can cut
the next transfers of a file after some bytes (the connection closes mid-body), make the
server ignore ``Range`` (a host that always sends the whole file), and read which requests
arrived.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ModelServer:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}   # "org/name" -> file name -> bytes
        self.files: dict[str, bytes] = {}              # "/files/x.pt" -> bytes
        #: path -> (bytes sent before the connection closes, how many transfers to cut)
        self.cut: dict[str, tuple[int, int]] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str, str | None]] = []   # method, path, Range header
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._answer(self, body=False)

            def do_GET(self):
                server._answer(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "ModelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _lookup(self, path: str) -> tuple[bytes | None, dict[str, str]]:
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            repo, revision, name = match.groups()
            if repo not in self.repos:
                return None, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            if name not in self.repos[repo]:
                return None, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
            data = self.repos[repo][name]
            commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
            return data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if path in self.files:
            return self.files[path], {}
        return None, {}

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        wanted = handler.headers.get("Range")
        self.requests.append((handler.command, path, wanted))
        data, headers = self._lookup(path)
        if data is None:
            handler.send_response(404)
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        payload = data[start:]
        cut, times = self.cut.get(path, (None, 0))
        if cut is not None and times > 0:
            self.cut[path] = (cut, times - 1)
            handler.wfile.write(payload[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(payload)
