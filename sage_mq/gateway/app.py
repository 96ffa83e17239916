"""The gateway app: OpenAI-compatible inference routes over the fleet's RUNNING engines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sage_mq.actor import freeze_startup_heap
from sage_mq.batch.service import BatchService
from sage_mq.broker import Broker
from sage_mq.connection import check_server
from sage_mq.control import ControlPlaneManager
from sage_mq.engines.openai_shapes import model_object
from sage_mq.errors import ControlPlaneUnavailable, SageMQError
from sage_mq.gateway.auth import KeyCheck
from sage_mq.gateway.batch_api import batch_router
from sage_mq.gateway.inference import PATHS, Inference
from sage_mq.gateway.limits import MAX_BODY_BYTES, BodyLimits
from sage_mq.gateway.management import management_router
from sage_mq.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from sage_mq.gateway.openapi import document
from sage_mq.gateway.proxy import Forwarder, openai_error
from sage_mq.gateway.refusals import on_bad_body, on_http_error, on_our_error, on_too_deep
from sage_mq.registry import Registry
from sage_mq.routing import Router
from sage_mq.settings import GatewayOptions, Settings
from sage_mq.upstream import Upstream


def app_from_env() -> FastAPI:
    """The gateway as each worker process of ``sage llm gateway run --workers N`` makes it,
    from the environment its parent set (Redis URL, namespace, policy, keys)."""
    options = GatewayOptions.from_env()
    app = create_app(
        Settings.from_env(),
        policy=options.policy,
        api_key=options.api_key,
        admin_key=options.admin_key,
        max_body_bytes=options.max_body_bytes,
    )
    freeze_startup_heap()
    return app


class Gateway(FastAPI):
    """FastAPI, with the inference routes served by :class:`Inference` ahead of its stack."""

    inference: ASGIApp
    keyed: bool = False
    limits: BodyLimits

    def openapi(self) -> dict[str, Any]:
        """The document as the gateway really answers (see :mod:`.openapi`)."""
        return document(self, keyed=self.keyed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        routed = self.inference if scope["path"] in PATHS else super().__call__
        await self.limits.guard(scope, receive, send, routed)


def create_app(
    settings: Settings,
    *,
    policy: str = "adaptive",
    api_key: str | None = None,
    admin_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The gateway for the fleet in ``settings``, routing by ``policy``.

    With ``api_key`` the inference routes want ``Authorization: Bearer <api_key>``; with
    ``admin_key`` the management routes want the admin key (which also opens inference).
    ``/health`` and ``/metrics`` are open.
    """
    router = Router(policy)
    metrics = GatewayMetrics()
    parts: dict[str, Any] = {"metrics": metrics}
    inference = Inference(metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        broker = Broker(settings)
        registry = Registry(broker.store, broker.bus)
        with contextlib.suppress(ControlPlaneUnavailable):
            await check_server(broker.redis)
            await registry.load()  # if Redis is away, follow() keeps trying
        follow = asyncio.create_task(registry.follow(), name="registry")
        upstream = Upstream()
        parts["registry"] = registry
        parts["forwarder"] = inference.forwarder = Forwarder(registry, router, upstream)
        parts["control"] = ControlPlaneManager(broker=broker)
        parts["batches"] = BatchService(settings, broker.redis)
        try:
            yield
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await upstream.aclose()
            await broker.aclose()

    app = Gateway(title="sage-mq gateway", lifespan=lifespan)
    app.inference = KeyCheck(inference, api_key=api_key, admin_key=admin_key)
    app.keyed = bool(api_key or admin_key)
    app.limits = BodyLimits(max_body_bytes)
    app.add_exception_handler(SageMQError, on_our_error)
    app.add_exception_handler(RequestValidationError, on_bad_body)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RecursionError, on_too_deep)
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
        return {
            "object": "list",
            "data": [model_object(m, "sage-mq") for m in parts["registry"].models()],
        }

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        if model in parts["registry"].models():
            return JSONResponse(model_object(model, "sage-mq"))
        message = f"the model {model!r} is not served here (see GET /v1/models)"
        return openai_error(404, message, "invalid_request_error", "model_not_found", "model")

    return app
