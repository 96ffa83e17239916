"""Message types on the streams (their stream-entry encoding is :mod:`sage_mq.wire`).

Requests go to the scheduler, commands (imperative) to one node agent, events (past tense) to all.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from sage_mq.engines.argv_policy import checked_for_model
from sage_mq.fields import Backend, EngineEnv, Label, Metadata, ServedModelName
from sage_mq.ids import EngineId, NodeId

SCHEMA_VERSION = 1

EngineKind = Literal["llm", "embedding"]


class Message(BaseModel):
    """Base of every payload: frozen, no unknown fields, told apart by ``TYPE``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    PERIODIC: ClassVar[bool] = False
    """Sent again every interval (ticks, probe reports): consumers keep no idempotency marker
    for it, since a fleet of 1,000 nodes would leave millions; a rare duplicate is harmless."""


# -- requests to the scheduler (sage:requests) -------------------------------------------


class StartEngine(Message):
    """Start an engine somewhere in the fleet."""

    TYPE: ClassVar[str] = "engine.start"
    engine_id: EngineId
    model: str = Field(min_length=1)
    kind: EngineKind = "llm"
    backend: Backend | None = None
    use_gpu: bool | None = None
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    port: int | None = Field(None, ge=1, le=65535)
    node: NodeId | None = None
    extra_args: tuple[str, ...] = ()
    required_memory_gb: float | None = Field(None, gt=0)
    engine_label: Label | None = None
    max_concurrent_requests: int | None = Field(None, ge=1)
    metadata: Metadata = Field(default_factory=dict)
    startup_timeout_s: float | None = Field(None, gt=0)
    served_model_name: ServedModelName | None = None
    """The name clients use (vLLM's ``--served-model-name``, llama.cpp's alias); the model
    id or path when not given."""
    env: EngineEnv = Field(default_factory=dict)
    """Variables for the engine process; their values are shown to no one."""

    @model_validator(mode="after")
    def _runnable(self) -> StartEngine:
        """The model and arguments are ones some node could run (see argv_policy)."""
        checked_for_model(self.backend, self.kind, self.model, self.extra_args)
        return self


class StopEngine(Message):
    """Stop an engine and free its GPUs and port."""

    TYPE: ClassVar[str] = "engine.stop"
    engine_id: EngineId


class RestartEngine(Message):
    """Restart an engine as itself now (an operator's request; a FAILED or STOPPED one is
    placed again)."""

    TYPE: ClassVar[str] = "engine.restart"
    engine_id: EngineId


class EvacuateNode(Message):
    """A lost node's grace is over: place its engines elsewhere (sent by the scheduler)."""

    TYPE: ClassVar[str] = "node.evacuate"
    node_id: NodeId


class SettleNode(Message):
    """A lost node came back a while ago: place the engines moved away from it that its agent
    did not report still running (sent by the scheduler)."""

    TYPE: ClassVar[str] = "node.settle"
    node_id: NodeId


class RelaunchEngine(Message):
    """A backoff timer fired: launch this generation's successor (sent by the scheduler)."""

    TYPE: ClassVar[str] = "engine.relaunch"
    engine_id: EngineId
    generation: int
    attempt: int


# -- commands to one node agent (sage:node:<id>:commands) --------------------------------


class LaunchEngine(Message):
    """Spawn an engine process with exactly these parameters."""

    TYPE: ClassVar[str] = "engine.launch"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    engine_id: EngineId
    generation: int = Field(ge=1)
    model: str
    kind: EngineKind
    backend: str
    host: str
    port: int = Field(ge=1, le=65535)
    gpus: tuple[int, ...] = ()
    use_gpu: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra_args: tuple[str, ...] = ()
    gpu_memory_utilization: float | None = None
    startup_timeout_s: float | None = Field(None, gt=0)
    served_model_name: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    record: dict[str, Any] | None = None
    """The engine record this launch carries out, as the scheduler wrote it. The agent keeps it
    beside the process and hands it back in ``engine.adopted``, so a scheduler that finds no
    record (Redis came back empty) can rebuild it instead of stopping a healthy engine."""


class TerminateEngine(Message):
    """Stop an engine process: SIGTERM to its group, grace, SIGKILL."""

    TYPE: ClassVar[str] = "engine.terminate"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    engine_id: EngineId
    grace_s: float | None = None
    generation: int | None = None
    """Only this generation of the engine (a stale copy), or whichever runs (None)."""


class AllocateGpus(Message):
    """Record that these GPUs of the node are reserved for an engine."""

    TYPE: ClassVar[str] = "gpu.allocate"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    engine_id: EngineId
    gpus: tuple[int, ...]
    memory_gb: float


class ReleaseGpus(Message):
    """Drop an engine's GPU reservation on the node."""

    TYPE: ClassVar[str] = "gpu.release"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    engine_id: EngineId


class ReportEngines(Message):
    """Say which engines this node runs (``engine.adopted`` for each): the scheduler asks a
    node it had lost and sees again, which cannot tell a cut link that healed from no cut."""

    TYPE: ClassVar[str] = "node.report"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""


class HealthTick(Message):
    """Probe every engine on the node now and report."""

    TYPE: ClassVar[str] = "health.tick"
    PERIODIC: ClassVar[bool] = True
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    timeout_s: float = 5.0


# -- events (sage:events) ----------------------------------------------------------------


class EnginePlaced(Message):
    """The scheduler chose a node, GPUs and port for an engine."""

    TYPE: ClassVar[str] = "engine.placed"
    engine_id: EngineId
    node: NodeId
    port: int
    gpus: tuple[int, ...] = ()
    memory_gb: float = 0.0


class EngineStarting(Message):
    """The agent spawned the engine process."""

    TYPE: ClassVar[str] = "engine.starting"
    engine_id: EngineId
    node: NodeId
    generation: int
    pid: int
    argv: tuple[str, ...]


class EngineReady(Message):
    """The engine answered its health endpoint."""

    TYPE: ClassVar[str] = "engine.ready"
    engine_id: EngineId
    node: NodeId
    generation: int
    url: str


class EngineExited(Message):
    """The engine process ended without being asked to."""

    TYPE: ClassVar[str] = "engine.exited"
    engine_id: EngineId
    node: NodeId
    generation: int
    returncode: int | None
    reason: str
    last_lines: tuple[str, ...] = ()


class EngineLaunchFailed(Message):
    """The agent could not spawn the engine (port busy, bad argv, unknown GPU…)."""

    TYPE: ClassVar[str] = "engine.launch_failed"
    engine_id: EngineId
    node: NodeId
    generation: int
    reason: str
    port_in_use: bool = False
    """Another process holds the port: the scheduler moves the engine to a free one."""
    refused: bool = False
    """The node will not run it as written (not allowed there): the engine ends FAILED at
    once, since trying again cannot help."""


class EnginePortChanged(Message):
    """Another process held the engine's port on its node: it moved to a free one."""

    TYPE: ClassVar[str] = "engine.port_changed"
    engine_id: EngineId
    node: NodeId
    old_port: int
    new_port: int
    reason: str


class EngineAdopted(Message):
    """An agent runs the engine's process: found still running after the agent restarted,
    or reported again when the agent reaches Redis after being cut off."""

    TYPE: ClassVar[str] = "engine.adopted"
    engine_id: EngineId
    node: NodeId
    generation: int
    pid: int
    record: dict[str, Any] | None = None
    """The record the engine was launched with (``engine.launch``'s), to rebuild a lost one."""
    ready: bool = False
    """It answered its health endpoint as the agent reported it (``engine.ready`` follows
    either way; a rebuilt record is RUNNING at once, whichever event is read first)."""


class EngineRestored(Message):
    """The scheduler rebuilt a record Redis had lost (it came back empty) from an agent's
    ``engine.adopted``: whoever keeps a picture of the fleet reads the record again."""

    TYPE: ClassVar[str] = "engine.restored"
    engine_id: EngineId
    node: NodeId
    generation: int
    state: str


class EngineUnhealthy(Message):
    """The engine is failing its probes (or did not become ready in time)."""

    TYPE: ClassVar[str] = "engine.unhealthy"
    engine_id: EngineId
    node: NodeId
    reason: str
    generation: int | None = None


class EngineRestarting(Message):
    """The scheduler will launch the engine again after ``delay_s``."""

    TYPE: ClassVar[str] = "engine.restarting"
    engine_id: EngineId
    attempt: int
    delay_s: float


class EngineFailed(Message):
    """The engine is FAILED: it holds no GPU and no port any more."""

    TYPE: ClassVar[str] = "engine.failed"
    engine_id: EngineId
    reason: str
    last_lines: tuple[str, ...] = ()


class EngineStopped(Message):
    """The engine process is gone after a stop (or was never launched)."""

    TYPE: ClassVar[str] = "engine.stopped"
    engine_id: EngineId
    node: NodeId | None = None
    returncode: int | None = None


class SchedulerElected(Message):
    """A scheduler took the leader lease; its commands carry this epoch from now on."""

    TYPE: ClassVar[str] = "scheduler.elected"
    name: str
    epoch: int


class NodeJoined(Message):
    """A node agent registered (or re-registered after a restart)."""

    TYPE: ClassVar[str] = "node.joined"
    node_id: NodeId
    address: str
    gpu_count: int
    epoch: int


class NodeLost(Message):
    """A node's liveness key expired."""

    TYPE: ClassVar[str] = "node.lost"
    node_id: NodeId


class NodeHealth(Message):
    """Probe results of every engine on a node for one health tick."""

    TYPE: ClassVar[str] = "node.health"
    PERIODIC: ClassVar[bool] = True
    node_id: NodeId
    results: dict[EngineId, bool]


class GpusAllocated(Message):
    """The agent recorded a GPU reservation."""

    TYPE: ClassVar[str] = "gpu.allocated"
    node: NodeId
    engine_id: EngineId
    gpus: tuple[int, ...]


class GpusReleased(Message):
    """The agent dropped a GPU reservation."""

    TYPE: ClassVar[str] = "gpu.released"
    node: NodeId
    engine_id: EngineId


class RequestRejected(Message):
    """The scheduler refused a request; ``reason`` says why in words."""

    TYPE: ClassVar[str] = "request.rejected"
    request_id: str
    request_type: str
    engine_id: EngineId | None = None
    reason: str


MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in Message.__subclasses__()}
"""Every message type by its dotted name (all payload classes above)."""
