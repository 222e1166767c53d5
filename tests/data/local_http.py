"""A real HTTP server on 127.0.0.1 (a free port), in a thread, for the download tests.

Nothing in the tests reaches the network: the download code talks HTTP to this server,
which answers through an ``app`` function. ``app(request)`` returns a :class:`Reply`;
``Reply.drop_after`` sends the headers of the whole body, then only that many bytes,
and closes the connection (a transfer killed mid-file).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None

    @classmethod
    def json(cls, value: Any, status: int = 200, **headers: str) -> Reply:
        return cls(
            status, json.dumps(value).encode(), {"Content-Type": "application/json", **headers}
        )


def serve_bytes(data: bytes, request: Request, *, drop_after: int | None = None) -> Reply:
    """``data`` as a file server sends it, honouring ``Range: bytes=N-``."""
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    if match is None:
        return Reply(200, data, headers, drop_after)
    start = int(match.group(1))
    if start >= len(data):
        return Reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    return Reply(206, data[start:], headers, drop_after)


class LocalServer:
    """``with LocalServer(app) as server:`` serves at ``server.url``; ``server.log`` holds
    every request seen."""

    def __init__(self, app: Callable[[Request], Reply]) -> None:
        self.app = app
        self.log: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                server.log.append(request)
                reply = server.app(request)
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.drop_after is None:
                    self.wfile.write(reply.body)
                    return
                self.wfile.write(reply.body[: reply.drop_after])
                self.wfile.flush()
                self.close_connection = True

            do_GET = _handle
            do_POST = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def paths(self, prefix: str = "") -> list[str]:
        return [r.path for r in self.log if r.path.startswith(prefix)]


@contextmanager
def local_server(app: Callable[[Request], Reply]) -> Iterator[LocalServer]:
    with LocalServer(app) as server:
        yield server
