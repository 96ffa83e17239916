"""Forwarding one OpenAI request to a replica: retried on another before the first byte,
streamed back without buffering after it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from sage_mq.gateway.registry import Registry
from sage_mq.routing import NoReplica, Replica, Router

_RETRY_STATUS = {502, 503, 504}
"""An engine answering these (restarting, overloaded) sent no body yet: try another."""


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class Forwarder:
    """Sends requests to replicas chosen by the router."""

    def __init__(self, registry: Registry, router: Router, http: httpx.AsyncClient) -> None:
        self.registry = registry
        self.router = router
        self.http = http

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
            self.router.started(replica)
            started = time.monotonic()
            try:
                request = self.http.build_request(
                    "POST",
                    f"{replica.url}{path}",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                upstream = await self.http.send(request, stream=True)
            except httpx.TransportError as exc:
                self.router.finished(replica, None)
                tried.add(replica.engine_id)
                last = f"{replica.engine_id}: {type(exc).__name__}: {exc}"
                continue
            if upstream.status_code in _RETRY_STATUS and len(tried) + 1 < len(replicas):
                await upstream.aclose()
                self.router.finished(replica, None)
                tried.add(replica.engine_id)
                last = f"{replica.engine_id}: HTTP {upstream.status_code}"
                continue
            media = upstream.headers.get("content-type", "application/json")
            headers = {"x-sage-engine": replica.engine_id}
            if stream:
                return StreamingResponse(
                    self._relay(upstream, replica, started),
                    status_code=upstream.status_code,
                    media_type=media,
                    headers=headers,
                )
            try:
                content = await upstream.aread()
            except httpx.TransportError as exc:
                self.router.finished(replica, None)
                return openai_error(
                    502, f"{replica.engine_id} broke off its answer: {exc}", "bad_gateway"
                )
            finally:
                await upstream.aclose()
            self.router.finished(replica, time.monotonic() - started)
            return Response(content, upstream.status_code, headers=headers, media_type=media)

    async def _relay(
        self, upstream: httpx.Response, replica: Replica, started: float
    ) -> AsyncIterator[bytes]:
        ok = False
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk  # as it comes: server-sent events are not held back
            ok = True
        finally:
            await upstream.aclose()
            self.router.finished(replica, time.monotonic() - started if ok else None)

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
