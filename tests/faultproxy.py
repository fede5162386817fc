"""A fault-injecting HTTP proxy in front of the test S3 server: the storage faults of the reliability tests.

Requests pass through unchanged (the Host header too, so SigV4 signatures still verify upstream) unless the proxy's
`rule` names a fault for them:

- `slowdown`: 503 SlowDown, what S3 answers when it throttles;
- `error500`: 500 InternalError;
- `reset`: the connection is reset before the request reaches the server;
- `reset_after`: the request reaches the server (a PUT is stored) and the connection is reset before the reply, so the
  client cannot know whether its write happened: the case conditional writes exist for;
- `slow`: the reply comes `slow_seconds` late.
- `cut`: the reply's headers and half its body come, then the connection is reset: a body cut short mid-stream,
  which botocore's retries (of a request, until its headers) do not cover.

`rule(method, path, n)` sees every request (n counts them from 1) and returns a fault or None. Every request and its
fault is logged in `requests`, so a test can check that a faulted request was retried.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slowdown", "error500", "reset", "reset_after", "slow", "cut")
ERROR_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], slow_seconds: float = 1.5):
        self.upstream, self.slow_seconds = upstream, slow_seconds
        self.rule: Callable[[str, str, int], str | None] = lambda method, path, n: None
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, fault)
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # resets we caused are expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            n = len(self.requests) + 1
            fault = self.rule(h.command, h.path, n)
            self.requests.append((h.command, h.path, fault))
            if fault:
                self.injected[fault] += 1
        if fault == "slowdown":
            return self._reply(h, 503, ERROR_XML.format(code="SlowDown", message="Please reduce your request rate."))
        if fault == "error500":
            return self._reply(h, 500, ERROR_XML.format(code="InternalError", message="We encountered an error."))
        if fault == "reset":
            return self._reset(h)
        if fault == "slow":
            time.sleep(self.slow_seconds)
        status, headers, data = self._forward(h, body)
        if fault == "reset_after" or (fault == "cut" and (h.command == "HEAD" or len(data) < 2)):
            return self._reset(h)  # (a reply without a body to cut is cut in its headers)
        h.send_response_only(status)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(name, value)
        # A HEAD reply has no body but keeps the object's length.
        length = dict((k.lower(), v) for k, v in headers).get("content-length") if h.command == "HEAD" else None
        h.send_header("Content-Length", length if length is not None else str(len(data)))
        h.end_headers()
        if fault == "cut":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return self._reset(h)
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for name, value in h.headers.items():
                conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, xml: str) -> None:
        data = xml.encode()
        h.send_response_only(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(data) if h.command != "HEAD" else 0))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Close with a TCP RST (linger 0): the client sees a connection reset, not a clean end."""
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        h.close_connection = True
