"""The gateway app: OpenAI-compatible inference routes over the fleet's RUNNING engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_mq.batch.service import BatchService
from sage_mq.bus import Bus
from sage_mq.connection import connect
from sage_mq.control import ControlPlaneManager
from sage_mq.errors import ControlPlaneUnavailable, SageMQError
from sage_mq.gateway.auth import KeyCheck
from sage_mq.gateway.batch_api import batch_router
from sage_mq.gateway.management import management_router, on_bad_body, on_our_error
from sage_mq.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from sage_mq.gateway.proxy import Forwarder, openai_error
from sage_mq.gateway.registry import Registry
from sage_mq.keys import Keys
from sage_mq.routing import Router
from sage_mq.settings import GatewayOptions, Settings
from sage_mq.store import Store
from sage_mq.upstream import Upstream


def app_from_env() -> FastAPI:
    """The gateway as each worker process of ``sage llm gateway run --workers N`` makes it,
    from the environment its parent set (Redis URL, namespace, policy, keys)."""
    options = GatewayOptions.from_env()
    return create_app(
        Settings.from_env(),
        policy=options.policy,
        api_key=options.api_key,
        admin_key=options.admin_key,
    )


def create_app(
    settings: Settings,
    *,
    policy: str = "adaptive",
    api_key: str | None = None,
    admin_key: str | None = None,
) -> FastAPI:
    """The gateway for the fleet in ``settings``, routing by ``policy``.

    With ``api_key`` the inference routes want ``Authorization: Bearer <api_key>``; with
    ``admin_key`` the management routes want the admin key (which also opens inference).
    ``/health`` and ``/metrics`` are open.
    """
    router = Router(policy)
    metrics = GatewayMetrics()
    parts: dict[str, Any] = {"metrics": metrics}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings)
        keys = Keys(settings.namespace)
        registry = Registry(Store(redis, keys), Bus(redis, keys, settings.bus))
        with contextlib.suppress(ControlPlaneUnavailable):
            await registry.load()  # if Redis is away, follow() keeps trying
        follow = asyncio.create_task(registry.follow(), name="registry")
        upstream = Upstream()
        parts["registry"] = registry
        parts["forwarder"] = Forwarder(registry, router, upstream)
        parts["control"] = ControlPlaneManager(settings, redis=redis)
        parts["batches"] = BatchService(settings, redis)
        try:
            yield
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await upstream.aclose()
            await redis.aclose()

    app = FastAPI(title="sage-mq gateway", lifespan=lifespan)
    app.add_exception_handler(SageMQError, on_our_error)
    app.add_exception_handler(RequestValidationError, on_bad_body)
    app.add_middleware(KeyCheck, api_key=api_key, admin_key=admin_key)
    app.include_router(management_router(parts))
    app.include_router(batch_router(parts))

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await metrics.render(parts["control"], parts["batches"])
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": parts["registry"].models()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "sage-mq"}
            for m in parts["registry"].models()
        ]
        return {"object": "list", "data": data}

    # Plain Starlette routes, first in line: the hot path skips FastAPI's dependency machinery.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.routes.insert(0, Route(path, _inference(path, parts), methods=["POST"]))
    return app


def _inference(path: str, parts: dict[str, Any]) -> Any:
    async def route(request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError:
            return openai_error(400, "the body is not JSON", "invalid_request_error")
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            return _bad("`model` is required: one of the names GET /v1/models lists")
        stream = bool(payload.get("stream"))
        forwarder: Forwarder = parts["forwarder"]
        metrics: GatewayMetrics = parts["metrics"]
        started = time.monotonic()
        response = await forwarder.forward(path, model, body, stream)
        # a name nothing serves is the caller's free text: one label for all, not one each
        label = model if forwarder.registry.known(model) else "(unknown)"
        metrics.requests.labels(path, label, str(response.status_code)).inc()
        metrics.latency.labels(path, label).observe(time.monotonic() - started)
        return response

    route.__name__ = path.strip("/").replace("/", "_")
    return route


def _bad(message: str) -> JSONResponse:
    return openai_error(400, message, "invalid_request_error")
