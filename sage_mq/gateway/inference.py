"""The three inference routes as plain ASGI, ahead of FastAPI.

Every request through FastAPI's stack passes five middleware layers, the router and a
``Request`` object before our code runs; for a hop whose whole job is to read ``model`` and
pass the body on, that was a large share of the gateway's CPU per request. Here the body is
read straight from ``receive`` and the forwarder's answer sent straight to ``send``. Keys are
checked by the same :class:`KeyCheck` as every other route.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sage_mq.gateway.metrics import GatewayMetrics
from sage_mq.gateway.proxy import Forwarder, openai_error

PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
log = logging.getLogger(__name__)


class Inference:
    """ASGI app for POSTs to :data:`PATHS`; the forwarder arrives once the gateway has started."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.forwarder: Forwarder | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        except Exception:  # what FastAPI's error middleware would do, in OpenAI's shape
            log.exception("inference request to %s failed", scope["path"])
            failed = openai_error(500, "the gateway failed; see its log", "server_error")
            # once an answer has begun, uvicorn refuses a second one and drops the connection
            with contextlib.suppress(RuntimeError):
                await failed(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            refused = openai_error(405, f"{scope['path']} takes POST", "invalid_request_error")
            refused.headers["allow"] = "POST"
            await refused(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:
            return  # the caller left before sending it all
        checked = _check(body)
        if isinstance(checked, Response):
            await checked(scope, receive, send)
            return
        model, stream = checked
        forwarder = self.forwarder
        if forwarder is None:
            raise RuntimeError("the gateway has not started")
        path: str = scope["path"]
        started = time.monotonic()
        answer = await forwarder.forward(path, model, body, stream)
        await answer(scope, receive, send)
        # a name nothing serves is the caller's free text: one label for all, not one each
        label = model if forwarder.registry.known(model) else "(unknown)"
        self.metrics.requests.labels(path, label, str(answer.status_code)).inc()
        self.metrics.latency.labels(path, label).observe(time.monotonic() - started)


async def _body(receive: Receive) -> bytes | None:
    """The request body, whole; None if the caller disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _check(body: bytes) -> Response | tuple[str, bool]:
    """``(model, stream)`` from an OpenAI request body, or the 400 that says what is wrong."""
    try:
        payload = json.loads(body)
    except ValueError:
        return openai_error(400, "the body is not JSON", "invalid_request_error")
    except RecursionError:
        return openai_error(400, "the body is nested too deeply", "invalid_request_error")
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model:
        return openai_error(
            400,
            "`model` is required: one of the names GET /v1/models lists",
            "invalid_request_error",
        )
    return model, bool(payload.get("stream"))
