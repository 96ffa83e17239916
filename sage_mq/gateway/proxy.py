"""Forwarding one OpenAI request to a replica: retried on another before the first byte,
streamed back without buffering after it.

Requests go out through :mod:`sage_mq.upstream` (keep-alive connections per replica).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from sage_mq.failover import Failover, worth_another
from sage_mq.registry import Registry
from sage_mq.routing import NoReplica, Replica, Router
from sage_mq.upstream import Upstream, UpstreamError, UpstreamResponse

"""An engine answering these (restarting, overloaded) sent no body yet: try another."""
log = logging.getLogger(__name__)


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Forwarder:
    """Sends requests to replicas chosen by the router."""

    def __init__(self, registry: Registry, router: Router, upstream: Upstream) -> None:
        self.registry = registry
        self.router = router
        self.upstream = upstream

    async def forward(self, path: str, model: str, body: bytes, stream: bool) -> Response:
        replicas = self.registry.replicas(model)
        if not replicas:
            return self._nothing_serves(model)
        kind = KIND_OF_PATH.get(path)
        if kind is not None and all(r.kind != kind for r in replicas):
            return _wrong_kind(model, replicas[0].kind, path)
        walk = Failover(self.router, model)
        while True:
            try:
                replica = walk.choose(replicas)
            except NoReplica as exc:
                return openai_error(503, str(exc), "service_unavailable", "no_replica_answered")
            answer = await self._attempt(replica, path, body, stream, walk.last_chance(replicas))
            if isinstance(answer, Response):
                return answer
            walk.failed(replica, answer)

    async def _attempt(
        self, replica: Replica, path: str, body: bytes, stream: bool, last_try: bool
    ) -> Response | str:
        """One replica's answer, or why it gave none (nothing has reached the caller then)."""
        self.router.started(replica)
        started = time.monotonic()
        try:
            upstream = await self.upstream.post(f"{replica.url}{path}", body)
        except UpstreamError as exc:
            self.router.finished(replica, None)
            return str(exc)
        if worth_another(upstream.status) and not last_try:
            upstream.close()
            self.router.finished(replica, None)
            return f"HTTP {upstream.status}"
        media = upstream.header("content-type") or "application/json"
        headers = {"x-sage-engine": replica.engine_id}
        if stream:
            return StreamingResponse(
                self._relay(upstream, replica, started),
                status_code=upstream.status,
                media_type=media,
                headers=headers,
            )
        try:
            content = await upstream.read()  # whole, so a break here is still not the caller's
        except UpstreamError as exc:
            self.router.finished(replica, None)
            return f"broke off its answer: {exc}"
        self.router.finished(replica, time.monotonic() - started)
        return Response(content, upstream.status, headers=headers, media_type=media)

    async def _relay(
        self, upstream: UpstreamResponse, replica: Replica, started: float
    ) -> AsyncIterator[bytes]:
        """The replica's stream, event by event as it comes (never held back longer than the
        event being read). If the replica breaks off, the stream ends with an error event in
        OpenAI's shape, so SDKs raise a clear error and the connection stays usable."""
        sse = (upstream.header("content-type") or "").startswith("text/event-stream")
        pending = b""
        ok = False
        try:
            async for chunk in upstream.chunks():
                if not sse:
                    yield chunk
                    continue
                pending += chunk
                cut = _last_event_end(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
            ok = True
        except UpstreamError as exc:
            log.warning("%s broke off a stream: %s", replica.engine_id, exc)
            pending = b""  # half an event: of no use to anyone
            if sse:
                yield _error_event(f"{replica.engine_id} broke off its answer mid-stream: {exc}")
        finally:
            upstream.close()
            self.router.finished(replica, time.monotonic() - started if ok else None)
        if pending:
            yield pending

    def _nothing_serves(self, model: str) -> JSONResponse:
        if self.registry.coming(model):
            busy = openai_error(
                503,
                f"no replica of {model!r} is RUNNING right now; one is on its way "
                "(see `sage llm engine list`)",
                "service_unavailable",
                "no_running_replica",
            )
            busy.headers["retry-after"] = "2"
            return busy
        models = ", ".join(self.registry.models()) or "none yet"
        why = "is not served now (its engines are stopped or failed)"
        return openai_error(
            404,
            f"the model {model!r} {why if self.registry.known(model) else 'does not exist here'}"
            f"; models being served: {models}",
            "invalid_request_error",
            "model_not_found",
            param="model",
        )


KIND_OF_PATH = {
    "/v1/chat/completions": "llm",
    "/v1/completions": "llm",
    "/v1/embeddings": "embedding",
}
"""The engine kind each inference path is for."""
_PATH_FOR_KIND = {"llm": "/v1/chat/completions", "embedding": "/v1/embeddings"}


def _wrong_kind(model: str, kind: str, path: str) -> JSONResponse:
    """OpenAI's answer to a model sent to an endpoint it does not serve (404, param model)."""
    return openai_error(
        404,
        f"{model!r} is an {'embedding' if kind == 'embedding' else 'LLM'} model and is not "
        f"served on {path}; use {_PATH_FOR_KIND.get(kind, 'its own endpoint')}",
        "invalid_request_error",
        "model_not_supported",
        param="model",
    )


def _last_event_end(buffer: bytes) -> int:
    """Where the last complete server-sent event in ``buffer`` ends (0: none yet)."""
    ends = (buffer.rfind(sep) + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if sep in buffer)
    return max(ends, default=0)


def _error_event(message: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": "engine_lost"}
    return f"data: {json.dumps({'error': error})}\n\n".encode()
