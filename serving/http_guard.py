"""The transport guard of ``ragtune serve``: what is checked before a request reaches the OpenAI app.

- :class:`GuardedH11Protocol` (uvicorn's h11 protocol, subclassed): a cap on open connections, a deadline
  for each request's headers (a client trickling bytes cannot hold a connection), OpenAI-shaped 400s for
  malformed HTTP (h11 refuses invalid or conflicting ``Content-Length`` and unknown transfer codings);
- :class:`RequestGuard` (ASGI middleware): the API key as a Bearer token (constant-time compare), then the
  body's framing and size (a declared length over the limit is refused before a byte is read, a chunked
  body is counted while read), then its arrival time. Every refusal closes the connection, so the rest
  of an unread body can never be parsed as the next request (request smuggling);
- :class:`OpenAIServer`: uvicorn on a socket bound up front (the port is known at once), in the
  foreground or in a thread.

uvicorn is the server vLLM's and llama.cpp's Python front ends use; these classes add only what it
leaves to the application. Limits and defaults: :class:`ServerLimits`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import anyio
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.config import ConfigError, field

MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = frozenset({"/health", "/v1/health"})  # answered without the API key (they reveal nothing)
TYPE_BY_STATUS = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
                   408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                   503: "server_error"}


@dataclass
class ServerLimits:
    """Limits of one server; every one has a default that is safe on a workstation."""

    max_body_bytes: int = field(MAX_BODY_BYTES, help="largest request body in bytes; a larger one gets 413 before it is read")
    max_concurrent: int = field(32, help="requests in the engine at once (decoded together in one batch, up to the engine's "
                                         "max_batch_rows; the rest wait there); one more gets 429 with Retry-After at once")
    max_connections: int = field(64, help="open TCP connections; one more gets 503 and is closed")
    keep_alive_s: int = field(5, help="an idle keep-alive connection is closed after this many seconds")
    header_timeout_s: float = field(10.0, help="a request's headers must arrive complete within this many seconds")
    body_timeout_s: float = field(30.0, help="a request's body must arrive complete within this many seconds")
    shutdown_timeout_s: float = field(5.0, help="on shutdown, requests still running after this many seconds are cancelled")

    def __post_init__(self) -> None:
        if not 1 <= self.max_body_bytes <= 64 << 20:
            raise ConfigError("max_body_bytes: use 1 to 67108864 (example: max_body_bytes=1048576)")
        if not 1 <= self.max_concurrent <= 1024 or not 1 <= self.max_connections <= 65536:
            raise ConfigError("max_concurrent (1-1024) and max_connections (1-65536) out of range (example: max_concurrent=8)")
        if self.max_connections < self.max_concurrent:
            raise ConfigError("max_connections must be >= max_concurrent (each running request holds a connection)")
        for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"{name}: use a number of seconds in (0, 3600] (example: {name}=10)")


# ---------------------------------------------------------------------------------------- errors

def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=True).encode()


TYPE_BY_STATUS = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
                   408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                   503: "server_error"}


# ------------------------------------------------------------------------- the request guard

class RequestGuard:
    """ASGI middleware: API key, then the body's framing and size, then its arrival time, all before the
    app reads a byte. Refusals close the connection (see the module docstring)."""

    def __init__(self, app: Any, limits: ServerLimits, api_key: Optional[str]) -> None:
        self.app = app
        self.limits = limits
        self._key = api_key.encode("utf-8") if api_key else None

    @staticmethod
    async def _refuse(send: Any, status: int, message: str, code: str, extra: Optional[list] = None) -> None:
        body = json_bytes(error_body(message, TYPE_BY_STATUS.get(status, "invalid_request_error"), code))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")] + (extra or [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = [v for k, v in headers if k == b"authorization"]
        token = b""
        if len(values) == 1:
            scheme, _, rest = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer":
                token = rest.strip()
        # compare_digest takes time independent of where the strings differ
        return hmac.compare_digest(token, self._key) and len(values) == 1 and bool(token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                                          "server was started with (--api-key or RAGTUNE_API_KEY)", "invalid_api_key",
                               [(b"www-authenticate", b"Bearer")])
            return
        lengths = [v for k, v in headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        limit = self.limits.max_body_bytes
        if lengths and chunked:
            await self._refuse(send, 400, "a request may carry Content-Length or Transfer-Encoding, not both; send one",
                               "bad_framing")
            return
        if lengths:
            raw = lengths[0].strip()
            if not raw.isdigit() or len(raw) > 18:  # h11 refuses these first; kept as a second line of defence
                await self._refuse(send, 400, "invalid Content-Length; send the body's length in bytes", "bad_content_length")
                return
            if int(raw) > limit:
                await self._refuse(send, 413, f"request body of {int(raw)} bytes is over the limit of {limit} bytes; "
                                              "send a smaller request", "body_too_large")
                return
        body = bytearray()
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > limit:
                        await self._refuse(send, 413, f"request body is over the limit of {limit} bytes; send a smaller "
                                                      "request", "body_too_large")
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(send, 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                               "body_timeout")
            return
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response listens for

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------- the connection

class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a deadline for each request's headers and
    OpenAI-shaped 400s for malformed HTTP. ``limits`` is set on the subclass :func:`make_server` builds."""

    limits: ServerLimits = ServerLimits()
    _head_timer: Optional[asyncio.TimerHandle] = None
    _rejected = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._rejected = True
            body = json_bytes(error_body(f"too many open connections (limit {self.limits.max_connections}); retry "
                                          "shortly", "server_error", "too_many_connections"))
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\nretry-after: 1\r\nconnection: close\r\n\r\n" + body)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no complete request head in time (idle, or a trickle of bytes)

    def send_400_response(self, msg: str) -> None:
        body = json_bytes(error_body("malformed HTTP request (request line, a header or Content-Length); fix the "
                                      "client", "invalid_request_error", "bad_http_request"))
        try:
            for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                       headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                                (b"content-length", str(len(body)).encode())]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response was already under way: just close
            pass
        self.transport.close()


# ------------------------------------------------------------------------------------ running

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning to print when the server listens beyond this machine with no API key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"warning: listening on {host} with no API key: anyone who can reach this port can use the model. "
            "Set RAGTUNE_API_KEY (or --api-key) and put a TLS proxy in front, or bind 127.0.0.1")


class OpenAIServer:
    """A uvicorn server on a socket bound at construction (so the port is known at once)."""

    def __init__(self, app: Any, host: str, port: int, limits: ServerLimits, verbose: bool = False) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        protocol = type("Protocol", (GuardedH11Protocol,), {"limits": limits})
        config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", interface="asgi3", log_config=None,
                                access_log=verbose, server_header=False, timeout_keep_alive=limits.keep_alive_s,
                                timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout_s)),
                                backlog=max(128, limits.max_connections))
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    @property
    def started(self) -> bool:
        return self._server.started

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or Ctrl-C when run in the main thread)."""
        self._server.run(sockets=[self.socket])

    def start(self) -> "OpenAIServer":
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="ragtune-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI server did not start; see the log above")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._server.config.timeout_graceful_shutdown + 5)

    def server_close(self) -> None:
        self.socket.close()
