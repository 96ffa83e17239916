"""Forwarding one OpenAI request to a replica: retried on another before the first byte,
streamed back without buffering after it.

Requests go out through httpcore, the connection pool under httpx, without httpx's request and
response models: on this hop they cost more than the rest of the gateway together
(``benchmarks/gateway_overhead.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator

import httpcore
from starlette.responses import JSONResponse, Response, StreamingResponse

from sage_mq.gateway.registry import Registry
from sage_mq.routing import NoReplica, Replica, Router

_RETRY_STATUS = {502, 503, 504}
"""An engine answering these (restarting, overloaded) sent no body yet: try another."""
_JSON = [(b"content-type", b"application/json")]
_UNREACHABLE = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)
"""What a replica that died, hung or broke the connection raises (nothing came back)."""
TIMEOUTS = {"connect": 5.0, "read": 600.0, "write": 60.0, "pool": 10.0}
log = logging.getLogger(__name__)


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class Pools:
    """Keep-alive connections to replicas, as many small httpcore pools per replica, taken in
    turn. httpcore's pool does work per request that grows with the square of its connections
    (at 64 connections it dominated the gateway's CPU); pools of a few connections keep that
    small, and each still handles keep-alive expiry and stale connections itself."""

    def __init__(self, per_pool: int = 8, pools_per_replica: int = 32) -> None:
        self.per_pool = per_pool
        self.pools_per_replica = pools_per_replica
        self._pools: dict[str, list[httpcore.AsyncConnectionPool]] = {}
        self._turn = 0

    def pool(self, base_url: str) -> httpcore.AsyncConnectionPool:
        """The next pool for a replica's base URL."""
        pools = self._pools.setdefault(base_url, [])
        self._turn += 1
        index = self._turn % self.pools_per_replica
        while len(pools) <= index:
            pools.append(
                httpcore.AsyncConnectionPool(
                    max_connections=self.per_pool, max_keepalive_connections=self.per_pool
                )
            )
        return pools[index]

    async def aclose(self) -> None:
        for pools in self._pools.values():
            for pool in pools:
                await pool.aclose()
        self._pools.clear()


class Forwarder:
    """Sends requests to replicas chosen by the router."""

    def __init__(self, registry: Registry, router: Router, pools: Pools) -> None:
        self.registry = registry
        self.router = router
        self.pools = pools

    async def forward(self, path: str, model: str, body: bytes, stream: bool) -> Response:
        replicas = self.registry.replicas(model)
        if not replicas:
            return self._nothing_serves(model)
        tried: set[str] = set()
        last = "no replica answered"
        while True:
            try:
                replica = self.router.choose(replicas, exclude=tried)
            except NoReplica:
                return openai_error(
                    503,
                    f"every RUNNING replica of {model!r} failed ({len(tried)} tried): {last}; "
                    "try again shortly (engines restart on their own)",
                    "service_unavailable",
                    "no_replica_answered",
                )
            last_try = len(tried) + 1 >= len(replicas)
            answer = await self._attempt(replica, path, body, stream, last_try)
            if isinstance(answer, Response):
                return answer
            tried.add(replica.engine_id)
            last = f"{replica.engine_id}: {answer}"

    async def _attempt(
        self, replica: Replica, path: str, body: bytes, stream: bool, last_try: bool
    ) -> Response | str:
        """One replica's answer, or why it gave none (nothing has reached the caller then)."""
        self.router.started(replica)
        started = time.monotonic()
        url, request_headers = _target(replica.url, path)
        request_headers = [*request_headers, (b"content-length", str(len(body)).encode())]
        request = httpcore.Request(
            "POST", url, headers=request_headers, content=body, extensions={"timeout": TIMEOUTS}
        )
        try:
            upstream = await self.pools.pool(replica.url).handle_async_request(request)
        except _UNREACHABLE as exc:
            self.router.finished(replica, None)
            return f"{type(exc).__name__}: {exc}"
        if upstream.status in _RETRY_STATUS and not last_try:
            await upstream.aclose()
            self.router.finished(replica, None)
            return f"HTTP {upstream.status}"
        media = _content_type(upstream)
        headers = {"x-sage-engine": replica.engine_id}
        if stream:
            return StreamingResponse(
                self._relay(upstream, replica, started),
                status_code=upstream.status,
                media_type=media,
                headers=headers,
            )
        try:
            content = await upstream.aread()  # whole, so a break here is still not the caller's
        except _UNREACHABLE as exc:
            self.router.finished(replica, None)
            return f"broke off its answer: {type(exc).__name__}: {exc}"
        finally:
            await upstream.aclose()
        self.router.finished(replica, time.monotonic() - started)
        return Response(content, upstream.status, headers=headers, media_type=media)

    async def _relay(
        self, upstream: httpcore.Response, replica: Replica, started: float
    ) -> AsyncIterator[bytes]:
        """The replica's stream, event by event as it comes (never held back longer than the
        event being read). If the replica breaks off, the stream ends with an error event in
        OpenAI's shape, so SDKs raise a clear error and the connection stays usable."""
        sse = _content_type(upstream).startswith("text/event-stream")
        pending = b""
        ok = False
        try:
            async for chunk in upstream.aiter_stream():
                if not sse:
                    yield chunk
                    continue
                pending += chunk
                cut = _last_event_end(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
            ok = True
        except _UNREACHABLE as exc:
            log.warning("%s broke off a stream: %s: %s", replica.engine_id, type(exc).__name__, exc)
            pending = b""  # half an event: of no use to anyone
            if sse:
                yield _error_event(f"{replica.engine_id} broke off its answer mid-stream: {exc}")
        finally:
            await upstream.aclose()
            self.router.finished(replica, time.monotonic() - started if ok else None)
        if pending:
            yield pending

    def _nothing_serves(self, model: str) -> JSONResponse:
        if self.registry.known(model):
            return openai_error(
                503,
                f"no replica of {model!r} is RUNNING right now (see `sage llm engine list`)",
                "service_unavailable",
                "no_running_replica",
            )
        models = ", ".join(self.registry.models()) or "none yet"
        return openai_error(
            404,
            f"the model {model!r} does not exist here; models being served: {models}",
            "invalid_request_error",
            "model_not_found",
        )


@functools.lru_cache(maxsize=4096)
def _target(base: str, path: str) -> tuple[httpcore.URL, list[tuple[bytes, bytes]]]:
    """A replica's route as a parsed URL and the request headers, made once."""
    url = httpcore.URL(f"{base}{path}")
    netloc = url.host if url.port is None else url.host + b":" + str(url.port).encode()
    return url, [(b"host", netloc), *_JSON]


def _content_type(response: httpcore.Response) -> str:
    for name, value in response.headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return "application/json"


def _last_event_end(buffer: bytes) -> int:
    """Where the last complete server-sent event in ``buffer`` ends (0: none yet)."""
    ends = (buffer.rfind(sep) + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if sep in buffer)
    return max(ends, default=0)


def _error_event(message: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": "engine_lost"}
    return f"data: {json.dumps({'error': error})}\n\n".encode()
