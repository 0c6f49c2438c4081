"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server (moto), for the flaky-store tests.

Clients reach it as their S3 endpoint (``endpoint_url=proxy.url``), through the same code that talks to AWS. It
forwards every request to the real server and, where a rule matches, answers for it instead: an error status
(500, 503, 503 ``SlowDown``), a connection reset before any answer or part-way through the object, or a stall
part-way through (the client's read timeout must notice). Every request is recorded (method, path, Range), so
a test can see that a broken download was resumed from where it stopped.

    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Fault("reset", path="scan.nii.gz", times=1, after_bytes=200_000))
        RemoteCache(cache_dir, endpoint_url=proxy.url).fetch("s3://bucket/scan.nii.gz")
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# What S3 says with each error status (the XML body botocore parses for the error code).
ERROR_ANSWERS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
KINDS = (*ERROR_ANSWERS, "reset", "stall", "drop")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Fault:
    """A rule: answer the next ``times`` matching requests with ``kind`` instead of the server's answer.

    ``kind``: ``500``, ``503``, ``slowdown`` (error answers); ``drop`` (close the connection without an answer);
    ``reset`` (send the headers and ``after_bytes`` of the body, then reset the connection); ``stall`` (the same,
    then send nothing for ``stall_s`` seconds and close). ``path`` must be part of the request's path;
    ``methods`` limits it to these (GET: object reads, HEAD: metadata). With ``probability`` below 1, each
    matching request is hit with that chance (the proxy's seeded random numbers), for a soak.
    """

    kind: str
    path: str = ""
    times: int = 1
    methods: tuple[str, ...] = ("GET",)
    after_bytes: int = 0
    stall_s: float = 5.0
    probability: float = 1.0
    used: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}: one of {', '.join(KINDS)}")

    def matches(self, method: str, path: str) -> bool:
        return self.used < self.times and method in self.methods and self.path in path


@dataclass
class Request:
    """One request the proxy saw, and the fault it injected (None: forwarded as it was)."""

    method: str
    path: str
    range: str | None
    fault: str | None


@dataclass
class FaultProxy:
    """The proxy: ``with FaultProxy(upstream) as proxy:`` serves on ``proxy.url`` until the block ends."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        target = urlsplit(self.upstream)
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The endpoint clients use."""
        assert self._server is not None, "the proxy is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, *faults: Fault) -> None:
        """Inject these faults into the next matching requests."""
        with self._lock:
            self.faults.extend(faults)

    def stats(self) -> dict[str, int]:
        """Requests seen, those answered with a fault, and those that came again after a fault on the same path."""
        with self._lock:
            failed_paths: set[str] = set()
            retried = 0
            for request in self.requests:
                if request.path in failed_paths:
                    retried += 1
                    failed_paths.discard(request.path)
                if request.fault is not None:
                    failed_paths.add(request.path)
            failed = sum(1 for r in self.requests if r.fault is not None)
            return {"requests": len(self.requests), "failed": failed, "retried": retried}

    def _take_fault(self, method: str, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None and fault.probability < 1.0 and self._random.random() >= fault.probability:
                fault = None
            if fault is not None:
                fault.used += 1
            self.requests.append(Request(method, path, range_header, fault.kind if fault else None))
            return fault

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the tests read the proxy's record instead

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self.owner._take_fault(self.command, self.path, self.headers.get("Range"))
        if fault is not None and fault.kind == "drop":
            self._reset()
            return
        if fault is not None and fault.kind in ERROR_ANSWERS:
            self._error(*ERROR_ANSWERS[fault.kind])
            return
        status, reason, headers, data = self._forward(body)
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[: fault.after_bytes])
        self.wfile.flush()
        if fault.kind == "stall":
            time.sleep(fault.stall_s)
        self._reset()

    def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.owner._upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), as a crashed server or a cut network does."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the connection was reset on purpose
            super().finish()
