"""Presets: a named set of engines in one YAML file (docs/contract.md §7), checked before anything
starts.

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
from sage_mq.spec import CheckedSpec, EngineSpec, WholeNumber

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
PRESET_NAME_PATTERN = _NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_PRESET_BYTES = 1024 * 1024
MAX_YAML_VALUES = 100_000
"""Values a preset may stand for once its YAML aliases are expanded (a real one has dozens)."""


class PresetError(ConfigError):
    """A preset file that cannot be used; the message names the file, engine and field."""


class PresetNotFound(PresetError):
    """No built-in preset (and no file) of that name."""


class PresetEngine(CheckedSpec):
    """One engine of a preset: its name and its spec (``tensor_parallel`` is the preset's
    spelling of ``tensor_parallel_size``; ``extra_args`` may be one string, split like a shell
    would, though no shell runs)."""

    name: str = Field(min_length=1, max_length=60, pattern=_NAME)
    tensor_parallel_size: WholeNumber = Field(1, ge=1, le=64, alias="tensor_parallel")

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return shlex.split(value) if isinstance(value, str) else value

    def spec_in(self, preset: str) -> EngineSpec:
        """Its spec as the preset starts it: labelled with its name, the preset in metadata."""
        return self.spec.model_copy(
            update={
                "engine_label": self.engine_label or self.name,
                "metadata": {"preset": preset, **self.metadata},
            }
        )


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
    """A preset file, or a built-in preset by name; :class:`PresetError` saying what is wrong.
    (For operators at a shell; a request over the network names built-ins only:
    :func:`load_builtin`.)"""
    path = Path(name_or_path)
    if path.is_file():
        return _load_file(path)
    return load_builtin(str(name_or_path))


def load_builtin(name: str) -> Preset:
    """A built-in preset, by its name only: never a path, so nothing else is read."""
    known = builtin_names()
    if name not in known:
        listed = ", ".join(known) or "none"
        raise PresetNotFound(
            f"no preset file {name[:80]!r} and no built-in preset of that name (built-in: {listed})"
        )
    return _load_file(BUILTIN_DIR / f"{name}.yaml")


def _load_file(path: Path) -> Preset:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_PRESET_BYTES + 1)
        text = raw.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read it: {exc}") from None
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f"{path}: larger than {MAX_PRESET_BYTES // 1024} KiB; not a preset")
    return parse_preset(load_yaml(text, str(path)), source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (line and column, from 1) and what, without YAML's quoted excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = f"{exc.context}: {exc.problem}" if exc.context else str(exc.problem)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(exc).split())


def load_yaml(text: str, source: str) -> Any:
    """YAML as data, refusing documents that would expand past :data:`MAX_YAML_VALUES` values
    through aliases (a "billion laughs" is a few hundred bytes) or nest too deep."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # characters YAML does not take
        raise PresetError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise PresetError(
                f"{source}: expands to more than {MAX_YAML_VALUES} values through YAML aliases"
            )
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise PresetError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise PresetError(f"{source}: nested too deeply to be a preset") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is copied out (each shared node
    counted once per use, computed once)."""
    known = seen.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, seen) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    seen[id(node)] = size
    return size


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
    err = min(exc.errors(), key=lambda e: e.get("loc", ())[2:3] != ("name",))  # the name first
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
                await cp.start_engine(
                    engine.spec_in(preset.name),
                    engine_id=engine_id,
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
