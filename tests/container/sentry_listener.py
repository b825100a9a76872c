"""A stand-in for Sentry's ingest endpoint on 127.0.0.1 that records cron check-ins."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SentryListener:
    """Accepts envelopes at /api/<project>/envelope/ and keeps their check-in items."""

    def __init__(self) -> None:
        self.checkins: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                listener._record(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def dsn(self, project: int = 42) -> str:
        return f"http://0123456789abcdef@127.0.0.1:{self.port}/{project}"

    def _record(self, path: str, body: bytes) -> None:
        items = [
            payload for header, payload in _envelope_items(body) if header.get("type") == "check_in"
        ]
        with self._lock:
            self.requests += 1
            self.checkins.extend(json.loads(payload) for payload in items)

    @contextmanager
    def running(self) -> Iterator[SentryListener]:
        thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


def _envelope_items(body: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(item header, payload) pairs; a payload is `length` bytes, or up to the newline."""
    pos = body.index(b"\n") + 1  # skip the envelope header
    while pos < len(body):
        end = body.find(b"\n", pos)
        if end == -1:
            return
        header = json.loads(body[pos:end])
        pos = end + 1
        if "length" in header:
            payload = body[pos : pos + header["length"]]
            pos += header["length"] + 1
        else:
            end = body.find(b"\n", pos)
            end = len(body) if end == -1 else end
            payload = body[pos:end]
            pos = end + 1
        yield header, payload
