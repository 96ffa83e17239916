"""Management REST under ``/v1/management`` (docs/contract.md §5), over
:class:`ControlPlaneManager`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from sage_mq.control import ControlPlaneManager
from sage_mq.engines.argv_policy import ARG_PATTERN, MODEL_PATTERN
from sage_mq.engines.env_policy import MAX_VALUE_CHARS, MAX_VARIABLES
from sage_mq.engines.env_policy import NAME_PATTERN as ENV_NAME_PATTERN
from sage_mq.errors import (
    InvalidRequest,
)
from sage_mq.fields import EngineKind
from sage_mq.ids import ENGINE_ID_PATTERN
from sage_mq.presets import PRESET_NAME_PATTERN, Preset, load_builtin, parse_preset
from sage_mq.spec import EngineSpec

ModelId = Annotated[str, Field(min_length=1, max_length=512, pattern=MODEL_PATTERN)]
EnginePath = Annotated[str, Path(pattern=ENGINE_ID_PATTERN)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS, pattern=ARG_PATTERN)]


class EngineStartRequest(EngineSpec):
    """Body of ``POST /v1/management/engines``: an engine spec under the REST names
    ``model_id`` and ``engine_kind``, strict JSON, and ``wait``. The shapes of the model, the
    served name and the environment are the published schema's (a 422); the rules of what a
    node may be asked to run are checked as the start is made (a 400 says why)."""

    model_config = ConfigDict(strict=True)
    model: ModelId = Field(alias="model_id")
    kind: EngineKind = Field("llm", alias="engine_kind")
    served_model_name: ModelId | None = None
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        max_length=MAX_VARIABLES,
        json_schema_extra={"additionalProperties": False},  # every name matches the pattern
    )
    wait: bool = False
    """Answer once the engine is RUNNING (or say why it is not) instead of at once."""


class PresetApplyRequest(BaseModel):
    """Body of ``POST /v1/management/presets/apply``: a built-in's name, or a preset itself."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None = Field(None, max_length=60, pattern=PRESET_NAME_PATTERN)
    preset: dict[str, Any] | None = None
    wait: bool = True
    rollback: bool = True


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
        record = await cp().start_engine(body.spec, wait=body.wait)
        return record.public()

    @api.get("/engines")
    async def list_engines() -> Any:
        return [r.public() for r in await cp().list_engines()]

    @api.get("/engines/{engine_id}")
    async def get_engine(engine_id: EnginePath) -> Any:
        return (await cp().get_engine(engine_id)).public()

    @api.delete("/engines/{engine_id}", status_code=202)
    async def stop_engine(engine_id: EnginePath, wait: bool = False) -> Any:
        return (await cp().stop_engine(engine_id, wait=wait)).public()

    @api.post("/engines/{engine_id}/restart", status_code=202)
    async def restart_engine(engine_id: EnginePath, wait: bool = False) -> Any:
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
    return load_builtin(body.name)  # a name, never a file on the gateway's host
