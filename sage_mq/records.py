"""The records sage-mq keeps of engines and nodes (docs/contract.md §2): their fields and states.
:mod:`sage_mq.store` reads and writes them in Redis."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sage_mq.engines.env_policy import masked
from sage_mq.gpu import GpuInfo
from sage_mq.spec import EngineSpec


class EngineState(StrEnum):
    """Engine states (contract)."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    RESTARTING = "RESTARTING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        """FAILED and STOPPED engines hold no GPU and no port."""
        return self in (EngineState.FAILED, EngineState.STOPPED)


class EngineRecord(BaseModel):
    """The engine record: contract fields first, then what restarts and placement need."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    engine_id: str
    model: str
    kind: str = "llm"
    backend: str = "vllm"
    state: EngineState = EngineState.PENDING
    node: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    gpus: list[int] = Field(default_factory=list)
    use_gpu: bool | None = None
    argv: list[str] = Field(default_factory=list)
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    # -- beyond the contract --
    generation: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra_args: list[str] = Field(default_factory=list)
    required_memory_gb: float | None = None
    memory_gb: float = 0.0
    engine_label: str | None = None
    max_concurrent_requests: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    requested_port: int | None = None
    requested_node: str | None = None
    startup_timeout_s: float | None = None
    gpu_memory_utilization: float | None = None
    restart_attempt: int = 0
    """Restart attempts in the current streak (reset after the stability window)."""
    running_since: float | None = None
    probe_failures: int = 0
    spent_generation: int = 0
    """The highest generation ever launched: a launch takes the next (after a copy was taken
    back, ``generation`` is lower)."""
    lost_node: str | None = None
    """The node it was moved away from when that node was lost: if that node's agent reports
    it still running before another copy serves, it is taken back."""
    served_model_name: str | None = None
    """The name clients use for it, when not ``model``."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables for its process. The values stay in Redis and the launch: :meth:`public` hides
    them."""

    @classmethod
    def pending(cls, engine_id: str, spec: EngineSpec) -> EngineRecord:
        """A PENDING record of an engine asked for with ``spec`` (its backend resolved)."""
        fields = spec.model_dump(exclude={"port", "node", "backend"})
        return cls(
            engine_id=engine_id,
            backend=spec.resolved_backend,
            requested_port=spec.port,
            requested_node=spec.node,
            **fields,
        )

    @property
    def spec(self) -> EngineSpec:
        """The spec it was asked for with (its backend resolved); read back, not judged again."""
        fields = {name: getattr(self, name) for name in _KEPT_AS_ASKED}
        return EngineSpec.model_construct(
            **fields,
            extra_args=tuple(self.extra_args),
            port=self.requested_port,
            node=self.requested_node,
        )

    @property
    def served_name(self) -> str:
        """The model name clients ask for: ``served_model_name``, else ``model``."""
        return self.served_model_name or self.model

    def public(self) -> dict[str, Any]:
        """The JSON shape of ``engine list --json`` and the REST API (env values hidden)."""
        return self.model_dump(mode="json") | {"env": masked(self.env)}


_KEPT_AS_ASKED = tuple(
    name for name in EngineSpec.model_fields if name not in ("port", "node", "extra_args")
)
"""Spec fields a record keeps under their own names (the port and node it was asked for are
``requested_port`` and ``requested_node``: ``port`` and ``node`` say where it is)."""


class NodeRecord(BaseModel):
    """The node record an agent writes when it registers."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    node_id: str
    address: str
    gpus: list[GpuInfo] = Field(default_factory=list)
    epoch: int = 0
    last_seen: float = Field(default_factory=time.time)
    started_at: float = Field(default_factory=time.time)
    port_range_start: int = 40000
    port_range_end: int = 40999
    hostname: str = ""
    agent_pid: int | None = None
    allowed_commands: list[str] = Field(default_factory=list)
    """Executables its operator lets the ``command`` backend run: names as given, and paths."""
    allowed_engine_flags: list[str] = Field(default_factory=list)
    """Gated engine flags its operator allows (``--allow-engine-flag``)."""
    runtimes: dict[str, str] | None = None
    """The backends it runs, with the version found (``{"vllm": "0.32.0", "fake": ...}``);
    None from an agent too old to say."""
    status: str = "up"
    """``up``, or ``lost`` once the scheduler saw its liveness key expire."""


class Reservation(BaseModel):
    """GPUs and memory (GiB per GPU) held by one engine on a node."""

    model_config = ConfigDict(frozen=True)
    gpus: list[int]
    memory_gb: float
