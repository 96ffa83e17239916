"""Management REST under ``/v1/management`` (DESIGN.md §5), over :class:`ControlPlaneManager`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from sage_mq.control import ControlPlaneManager
from sage_mq.errors import (
    ConfigError,
    ControlPlaneUnavailable,
    EngineFailedError,
    EngineNotFound,
    InvalidRequest,
    PresetApplyError,
    RequestRejectedError,
    SageMQError,
    WaitTimeout,
)
from sage_mq.presets import Preset, load_preset, parse_preset


class EngineStartRequest(BaseModel):
    """Body of ``POST /v1/management/engines``."""

    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1)
    engine_kind: Literal["llm", "embedding"] = "llm"
    use_gpu: bool | None = None
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    port: int | None = Field(None, ge=1, le=65535)
    node: str | None = None
    backend: Literal["vllm", "embedding", "command", "fake"] | None = None
    required_memory_gb: float | None = Field(None, gt=0)
    engine_label: str | None = None
    max_concurrent_requests: int | None = Field(None, ge=1)
    extra_args: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    wait: bool = False
    """Answer once the engine is RUNNING (or say why it is not) instead of at once."""


class PresetApplyRequest(BaseModel):
    """Body of ``POST /v1/management/presets/apply``: a built-in's name, or a preset itself."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    preset: dict[str, Any] | None = None
    wait: bool = True
    rollback: bool = True


_STATUS: list[tuple[type[SageMQError], int]] = [
    (EngineNotFound, 404),
    (InvalidRequest, 400),
    (ConfigError, 400),
    (RequestRejectedError, 409),
    (EngineFailedError, 409),
    (PresetApplyError, 409),
    (WaitTimeout, 504),
    (ControlPlaneUnavailable, 503),
]


def error_response(exc: SageMQError) -> JSONResponse:
    """Our error as JSON with the status that says what kind it is."""
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"error": exc.to_wire()}, status_code=status)


def management_router(parts: dict[str, Any]) -> APIRouter:
    """The routes; ``parts["control"]`` is the gateway's ControlPlaneManager."""
    api = APIRouter(prefix="/v1/management")

    def cp() -> ControlPlaneManager:
        control: ControlPlaneManager = parts["control"]
        return control

    _engine_routes(api, cp)
    _fleet_routes(api, cp)
    return api


def _engine_routes(api: APIRouter, cp: Callable[[], ControlPlaneManager]) -> None:
    @api.post("/engines", status_code=202)
    async def start_engine(body: EngineStartRequest) -> Any:
        fields = body.model_dump(exclude={"model_id", "engine_kind"})
        record = await cp().request_engine_startup(
            body.model_id, engine_kind=body.engine_kind, **fields
        )
        return record.public()

    @api.get("/engines")
    async def list_engines() -> Any:
        return [r.public() for r in await cp().list_engines()]

    @api.get("/engines/{engine_id}")
    async def get_engine(engine_id: str) -> Any:
        return (await cp().get_engine(engine_id)).public()

    @api.delete("/engines/{engine_id}", status_code=202)
    async def stop_engine(engine_id: str, wait: bool = False) -> Any:
        return (await cp().stop_engine(engine_id, wait=wait)).public()

    @api.post("/engines/{engine_id}/restart", status_code=202)
    async def restart_engine(engine_id: str, wait: bool = False) -> Any:
        return (await cp().restart_engine(engine_id, wait=wait)).public()


def _fleet_routes(api: APIRouter, cp: Callable[[], ControlPlaneManager]) -> None:
    @api.get("/nodes")
    async def nodes() -> Any:
        return [
            {**record.model_dump(mode="json"), "alive": alive}
            for record, alive in await cp().list_nodes()
        ]

    @api.get("/gpus")
    async def gpus() -> Any:
        return await cp().gpus()

    @api.get("/status")
    async def status() -> Any:
        return await cp().status()

    @api.post("/presets/apply")
    async def apply_preset(body: PresetApplyRequest) -> Any:
        records = await cp().apply_preset(_preset_of(body), wait=body.wait, rollback=body.rollback)
        return [r.public() for r in records]


def _preset_of(body: PresetApplyRequest) -> Preset:
    if body.preset is not None and body.name is None:
        return parse_preset(body.preset, source="the request's preset")
    if body.name is None or body.preset is not None:
        raise InvalidRequest("give either `name` (a built-in preset) or `preset` (its body)")
    if "/" in body.name or body.name.startswith("."):  # never a path on the gateway's host
        raise InvalidRequest("`name` is a built-in preset's name; send a file's body as `preset`")
    return load_preset(body.name)


async def on_our_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler for :class:`SageMQError`."""
    assert isinstance(exc, SageMQError)
    return error_response(exc)


async def on_bad_body(_request: Request, exc: Exception) -> JSONResponse:
    """A body that does not fit its model: 422, naming the first field and what is wrong."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = f"field {where!r}: {first.get('msg', 'invalid')} ({len(exc.errors())} error(s))"
    wire = {"type": "InvalidRequest", "message": message, "retryable": False}
    return JSONResponse({"error": wire}, status_code=422)
