"""Presets: a named set of engines in one YAML file (DESIGN.md §7), checked before anything starts.

Built-in presets live in ``presets/`` at the top of the checkout; a wheel installs them as data
files under ``<prefix>/share/sage-mq/presets``. A file that cannot be used is refused with the
file, the engine and the field named.
"""

from __future__ import annotations

import os
import shlex
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sage_mq.errors import (
    ConfigError,
    EngineFailedError,
    InvalidRequest,
    PresetApplyError,
    RequestRejectedError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from sage_mq.control import ControlPlaneManager, EventCallback
    from sage_mq.store import EngineRecord


def _builtin_dir() -> Path:
    """``presets/`` of the checkout (editable installs), else the copy a wheel installed."""
    checkout = Path(__file__).resolve().parent.parent / "presets"
    prefixes = (sys.prefix, sysconfig.get_path("data", f"{os.name}_user"))
    installed = [Path(prefix) / "share" / "sage-mq" / "presets" for prefix in prefixes]
    for candidate in (checkout, *installed):
        if candidate.is_dir():
            return candidate
    return checkout  # none: builtin_names() is empty and naming a built-in says so


BUILTIN_DIR = _builtin_dir()
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class PresetError(ConfigError):
    """A preset file that cannot be used; the message names the file, engine and field."""


class PresetEngine(BaseModel):
    """One engine of a preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=60, pattern=_NAME)
    kind: Literal["llm", "embedding"] = "llm"
    model: str = Field(min_length=1)
    tensor_parallel: int = Field(1, ge=1, le=64)
    use_gpu: bool | None = None
    backend: Literal["vllm", "embedding", "command", "fake"] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    node: str | None = None
    extra_args: tuple[str, ...] = ()
    required_memory_gb: float | None = Field(None, gt=0)
    max_concurrent_requests: int | None = Field(None, ge=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """``extra_args`` as a list, or as one string split like a shell would (no shell runs)."""
        return shlex.split(value) if isinstance(value, str) else value


class Preset(BaseModel):
    """A named set of engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=60, pattern=_NAME)
    engines: tuple[PresetEngine, ...] = Field(min_length=1)

    @field_validator("engines")
    @classmethod
    def _unique(cls, engines: tuple[PresetEngine, ...]) -> tuple[PresetEngine, ...]:
        seen: set[str] = set()
        for engine in engines:
            if engine.name in seen:
                raise ValueError(f"two engines are named {engine.name!r}; names must differ")
            seen.add(engine.name)
        return engines

    def engine_id(self, engine: PresetEngine) -> str:
        """The engine id an engine of this preset gets: ``<preset>-<engine>``."""
        return f"{self.name}-{engine.name}"


def builtin_names() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A built-in preset by name, or a preset file; :class:`PresetError` saying what is wrong."""
    path = Path(name_or_path)
    if not path.is_file():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(builtin_names()) or "none"
            raise PresetError(
                f"no preset file {str(name_or_path)!r} and no built-in preset of that name "
                f"(built-in: {known})"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    return parse_preset(data, source=str(path))


def parse_preset(data: Any, *, source: str = "preset") -> Preset:
    """A preset from parsed YAML/JSON; errors name the source, the engine and the field."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset is a mapping with version, name and engines")
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        raise PresetError(f"{source}: {_where(exc, data)}") from None


def _where(exc: ValidationError, data: dict[str, Any]) -> str:
    """The first error as 'engine 'chat' (engines[0]), field 'port': message'."""
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    message = err.get("msg", "invalid")
    if len(loc) >= 2 and loc[0] == "engines" and isinstance(loc[1], int):
        engines = data.get("engines") or []
        raw = engines[loc[1]] if loc[1] < len(engines) else {}
        name = raw.get("name") if isinstance(raw, dict) else None
        engine = f"engine {name!r} (engines[{loc[1]}])" if name else f"engines[{loc[1]}]"
        field = ".".join(str(p) for p in loc[2:])
        return f"{engine}, field {field!r}: {message}" if field else f"{engine}: {message}"
    field = ".".join(str(p) for p in loc) or "preset"
    return f"field {field!r}: {message}"


async def apply(
    cp: ControlPlaneManager,
    preset: Preset,
    *,
    wait: bool = True,
    rollback: bool = True,
    timeout: float = 1800.0,
    on_event: EventCallback | None = None,
) -> list[EngineRecord]:
    """Start every engine of a preset, as ``<preset>-<engine>``; one already there is left as
    it is, a STOPPED or FAILED one is restarted. If an engine is rejected or fails (seen
    when waiting), the engines this call started are stopped again, unless ``rollback`` is
    off, and :class:`PresetApplyError` says which engine and why."""
    started: list[str] = []
    records: list[EngineRecord] = []
    for engine in preset.engines:
        engine_id = preset.engine_id(engine)
        try:
            existing = await cp.store.get_engine(engine_id)
            if existing is not None and not existing.state.terminal:
                records.append(existing)  # applying twice starts nothing twice
                continue
            if existing is not None:
                records.append(
                    await cp.restart_engine(
                        engine_id, wait=wait, timeout=timeout, on_event=on_event
                    )
                )
                started.append(engine_id)
                continue
            records.append(
                await cp.request_engine_startup(
                    engine.model,
                    engine_id=engine_id,
                    engine_kind=engine.kind,
                    use_gpu=engine.use_gpu,
                    tensor_parallel_size=engine.tensor_parallel,
                    port=engine.port,
                    node=engine.node,
                    backend=engine.backend,
                    extra_args=engine.extra_args,
                    required_memory_gb=engine.required_memory_gb,
                    engine_label=engine.name,
                    max_concurrent_requests=engine.max_concurrent_requests,
                    metadata={"preset": preset.name, **engine.metadata},
                    wait=wait,
                    timeout=timeout,
                    on_event=on_event,
                )
            )
            started.append(engine_id)
        except (InvalidRequest, RequestRejectedError, EngineFailedError, WaitTimeout) as exc:
            undone = await _roll_back(cp, started) if rollback else []
            raise PresetApplyError(
                f"preset {preset.name}: engine {engine.name} ({engine_id}): {exc}"
                + (f"; stopped what it had started: {', '.join(undone)}" if undone else "")
            ) from exc
    return records


async def _roll_back(cp: ControlPlaneManager, engine_ids: list[str]) -> list[str]:
    for engine_id in reversed(engine_ids):
        await cp.stop_engine(engine_id)
    return engine_ids
