"""The engine spec: what an engine is, as someone asked for it (``engine start``'s options).

One :class:`EngineSpec` is composed into every shape that carries one: the start request
(:class:`~sage_mq.messages.StartEngine`), the launch command, the preset entry, the REST body and
the engine record (:attr:`~sage_mq.records.EngineRecord.spec`). :class:`CheckedSpec` adds the
rules of what a node may be asked to run (:mod:`sage_mq.engines.argv_policy`, ``env_policy``),
checked where a request enters: a start request and a preset entry. A launch command is not
judged again by them; the agent judges it by its node's own rules.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from sage_mq.engines.argv_policy import (
    ARG_PATTERN,
    MAX_ARG_CHARS,
    MAX_ARGS,
    check_engine_args,
    check_model,
)
from sage_mq.engines.env_policy import check_engine_env
from sage_mq.errors import InvalidRequest
from sage_mq.fields import Backend, EngineKind, Label, Metadata, default_backend
from sage_mq.ids import NodeId


def whole(value: Any) -> Any:
    """JSON's integers include ``60.0``: a float with no fraction is the int it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _as_tuple(value: Any) -> Any:
    """A list where a tuple is kept (JSON has no tuples; strict validation wants one)."""
    return tuple(value) if isinstance(value, list) else value


WholeNumber = Annotated[int, BeforeValidator(whole)]
Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(whole)]
AtLeastOne = Annotated[int, Field(ge=1), BeforeValidator(whole)]
ExtraArg = Annotated[str, Field(max_length=MAX_ARG_CHARS, pattern=ARG_PATTERN)]


class EngineSpec(BaseModel):
    """What an engine is: everything ``engine start`` takes (docs/contract.md §3, §6), frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(min_length=1)
    """The model id or path the engine loads."""
    kind: EngineKind = "llm"
    backend: Backend | None = None
    """None: the default of ``kind`` (:func:`~sage_mq.fields.default_backend`)."""
    use_gpu: bool | None = None
    tensor_parallel_size: WholeNumber = Field(1, ge=1, le=64)
    pipeline_parallel_size: WholeNumber = Field(1, ge=1, le=64)
    port: Port | None = None
    """The port asked for; None: the scheduler assigns one from the node's range."""
    node: NodeId | None = None
    """The node asked for; None: placement chooses."""
    extra_args: Annotated[tuple[ExtraArg, ...], BeforeValidator(_as_tuple)] = Field(
        (), max_length=MAX_ARGS
    )
    required_memory_gb: float | None = Field(None, gt=0, le=1_000_000)
    engine_label: Label | None = None
    max_concurrent_requests: AtLeastOne | None = None
    metadata: Metadata = Field(default_factory=dict)
    startup_timeout_s: float | None = Field(None, gt=0)
    served_model_name: str | None = None
    """The name clients use (vLLM's ``--served-model-name``, llama.cpp's alias); the model
    id or path when not given."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables for the engine process; their values are shown to no one."""

    @property
    def spec(self) -> EngineSpec:
        """The spec alone, of anything composed of one (a request, a launch, a preset entry)."""
        return EngineSpec.model_construct(
            **{name: getattr(self, name) for name in EngineSpec.model_fields}
        )

    @property
    def resolved_backend(self) -> str:
        """The backend it runs on: the one named, else the default of its kind."""
        return self.backend or default_backend(self.kind)

    def check_runnable(self) -> None:
        """Raise :class:`InvalidRequest` if no node would run it as written: its model name,
        arguments, served name and environment (the request-side rules)."""
        check_engine_args(self.resolved_backend, self.model, self.extra_args)
        if self.served_model_name is not None:
            try:
                check_model(self.served_model_name)
            except InvalidRequest as exc:
                said = str(exc).replace("the model name", "the served model name")
                raise InvalidRequest(said) from None
        check_engine_env(self.env)


class CheckedSpec(EngineSpec):
    """An engine spec as it enters (a start request, a preset entry): one no node would run as
    written is refused with the reason (a ``ValueError`` to pydantic, so a wire entry holding
    one goes to the dead letters and a preset names the engine)."""

    @model_validator(mode="after")
    def _runnable(self) -> CheckedSpec:
        try:
            self.check_runnable()
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None
        return self
