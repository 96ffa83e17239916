"""How the gateway is served: uvicorn, with the timeouts it lacks.

uvicorn closes a connection that stays idle between requests (keep-alive), but a client that
opens a connection and sends its headers, or its body, a byte a minute keeps a connection and
its buffers for ever: 500 of them were never closed. :class:`GuardedHttp` gives a request
``header_timeout_s`` to arrive whole up to its body, and lets its body pause no longer than
``body_timeout_s``; then the connection gets ``408`` and is closed. The time the gateway itself
takes to answer (an engine loading, a long stream) is never counted.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sage_mq.errors import ConfigError

HEADER_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 60.0
_TIMEOUT_BODY = (
    b'{"error": {"message": "the request came too slowly", "type": "invalid_request_error", '
    b'"param": null, "code": "request_timeout"}}'
)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_TIMEOUT_BODY)}\r\n\r\n".encode()
    + _TIMEOUT_BODY
)


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration plus the two timeouts :class:`GuardedHttp` keeps (picklable, as
    ``--workers N`` hands it to each worker process)."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        **options: Any,
    ) -> None:
        super().__init__(app, http=GuardedHttp, **options)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline while a request is being read."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout = getattr(config, "header_timeout_s", HEADER_TIMEOUT_S)
        self._body_timeout = getattr(config, "body_timeout_s", BODY_TIMEOUT_S)
        self._phase = ""
        """``headers`` or ``body`` while a request is being read, else empty."""
        self._last_input = 0.0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await("headers", self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._await("", 0)
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._last_input = time.monotonic()
        self._await("body", self._body_timeout)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._last_input = time.monotonic()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._await("", 0)  # read whole: from here on the time is the gateway's

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request is in already
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await("headers", self._header_timeout)

    def _await(self, phase: str, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase:
            self._deadline = self.loop.call_later(seconds, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self._phase == "body":
            idle = time.monotonic() - self._last_input
            if self.flow.read_paused or idle < self._body_timeout:  # (paused: the app's doing)
                self._deadline = self.loop.call_later(
                    max(0.1, self._body_timeout - idle), self._expired
                )
                return
        if self._phase and not self.transport.is_closing():
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_TIMED_OUT)
            self.transport.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or :class:`ConfigError` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    # that say they are TCP, and without that every answer in two writes waited 40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "; choose another with --port" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(
            f"the gateway cannot listen on {host}:{port}: {exc.strerror}{hint}"
        ) from None
    sock.set_inheritable(False)
    return sock
