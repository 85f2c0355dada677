"""A reverse proxy in front of the S3 server that injects the faults an object store shows:
503 SlowDown throttling, connections reset in the middle of a body, objects that serve fewer
bytes than their listing says, 403s, a proxy that drops the Range header (the whole object
sent), and latency. moto has no fault injection of its own.

    with FaultProxy(endpoint) as proxy:
        proxy.add("slowdown", times=3)                   # the next 3 ranged GETs answer 503
        proxy.add("reset", key="ckpt/run/step-5/__0_0.distcp")   # every ranged GET of it
        ... point the client at proxy.url ...
        proxy.requests("GET")                            # what was asked, with its Range

Bodies are streamed through, so a multi-GB download does not sit in memory here.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

FAULTS = ("slowdown", "reset", "truncate", "deny", "whole")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer"}
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
    "</Message><Resource>{key}</Resource><RequestId>fault-proxy</RequestId></Error>"
)
_COPY = 1 << 20


@dataclass
class Rule:
    """A fault for requests on ``key`` ("bucket/key"; None: any), ``times`` times (None:
    always). ``slowdown``, ``reset`` and ``whole`` hit ranged GETs, ``truncate`` GETs, ``deny``
    any request. ``keep``: the bytes of the object a truncated one still serves."""

    fault: str
    key: str | None = None
    times: int | None = None
    keep: int = 0


@dataclass(frozen=True)
class Request:
    method: str
    key: str  # "bucket/key", as the path names it
    range: tuple[int, int] | None  # [start, end) of a ranged GET
    outcome: str  # "ok" or the fault injected


@dataclass
class _State:
    rules: list[Rule] = field(default_factory=list)
    log: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        """Resets are what this server is for: not worth a traceback."""


class FaultProxy:
    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.delay_s = delay_s
        self._state = _State()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ the test's side

    def add(self, fault: str, key: str | None = None, times: int | None = None, keep: int = 0):
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self._lock:
            self._state.rules.append(Rule(fault, key, times, keep))

    def clear(self) -> None:
        """No more faults, and a fresh log."""
        with self._lock:
            self._state = _State()

    def requests(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._state.log if method in (None, r.method)]

    @property
    def max_in_flight(self) -> int:
        return self._state.max_in_flight

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ the proxy's side

    def _take(self, method: str, key: str, ranged: bool) -> Rule | None:
        """The first rule that applies to this request, counted down."""
        with self._lock:
            for rule in self._state.rules:
                if rule.key not in (None, key) or rule.times == 0:
                    continue
                applies = {
                    "slowdown": ranged,
                    "reset": ranged,
                    "whole": ranged,
                    "truncate": method == "GET",
                    "deny": True,
                }[rule.fault]
                if applies:
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                with proxy._lock:
                    proxy._state.in_flight += 1
                    proxy._state.max_in_flight = max(
                        proxy._state.max_in_flight, proxy._state.in_flight
                    )
                try:
                    self._serve()
                finally:
                    with proxy._lock:
                        proxy._state.in_flight -= 1

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one

            def _serve(self) -> None:
                body = self._request_body()
                key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
                span = _parse_range(self.headers.get("Range"))
                ranged = self.command == "GET" and span is not None
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                rule = proxy._take(self.command, key, ranged)
                fault = rule.fault if rule else "ok"
                with proxy._lock:
                    proxy._state.log.append(Request(self.command, key, span, fault))
                if fault == "deny":
                    return self._error(403, "AccessDenied", "Access Denied", key)
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.", key)
                self._forward(body, rule)

            def _request_body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else None

            def _error(self, status: int, code: str, message: str, key: str) -> None:
                data = _ERROR.format(code=code, message=message, key=key).encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, body: bytes | None, rule: Rule | None) -> None:
                dropped = _HOP | ({"range"} if rule and rule.fault == "whole" else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    length = int(resp.getheader("Content-Length") or 0)
                    announce = send = length
                    status = resp.status
                    if rule and rule.fault == "truncate" and status in (200, 206):
                        out, send = _truncated(out, length, rule.keep)
                        announce = send
                        if not send:
                            return self._error(416, "InvalidRange", "Not satisfiable", "")
                    elif rule and rule.fault == "reset":
                        send = length // 2  # of a body announced whole
                    self.send_response_only(status)
                    for k, v in out:
                        if k.lower() not in ("server", "date", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(announce))
                    self.end_headers()
                    if self.command != "HEAD":
                        left = send
                        while left > 0:
                            data = resp.read(min(_COPY, left))
                            if not data:
                                break
                            self.wfile.write(data)
                            left -= len(data)
                finally:
                    conn.close()
                if rule and rule.fault == "reset":
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()

        return Handler


def _parse_range(value: str | None) -> tuple[int, int] | None:
    """``bytes=a-b`` as ``(a, b + 1)``."""
    if not value or not value.startswith("bytes="):
        return None
    first, _, last = value[len("bytes=") :].partition("-")
    if not first or not last:
        return None
    return int(first), int(last) + 1


def _truncated(
    headers: list[tuple[str, str]], length: int, keep: int
) -> tuple[list[tuple[str, str]], int]:
    """The response of an object cut to its first ``keep`` bytes: Content-Range rewritten,
    and how many of the upstream body's bytes to send. A checksum of the whole object is left
    out, as a store that really holds the shorter object would not send the longer one's."""
    headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum-")]
    for i, (k, v) in enumerate(headers):
        if k.lower() == "content-range":  # bytes a-b/total
            start = int(v.split(" ", 1)[1].split("-", 1)[0])
            send = max(0, min(length, keep - start))
            headers[i] = (k, f"bytes {start}-{start + send - 1}/{keep}")
            return headers, send
    return headers, min(length, keep)
