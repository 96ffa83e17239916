"""Message types on the streams (their stream-entry encoding is :mod:`sage_mq.wire`).

Requests go to the scheduler, commands (imperative) to one node agent, events (past tense) to all.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from sage_mq.ids import EngineId, NodeId
from sage_mq.spec import CheckedSpec, EngineSpec

SCHEMA_VERSION = 1


class Message(BaseModel):
    """Base of every payload: frozen, no unknown fields, told apart by ``TYPE``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    PERIODIC: ClassVar[bool] = False
    """Sent again every interval (ticks, probe reports): consumers keep no idempotency marker
    for it, since a fleet of 1,000 nodes would leave millions; a rare duplicate is harmless."""


# -- requests to the scheduler (sage:requests) -------------------------------------------


class StartEngine(Message, CheckedSpec):
    """Start an engine somewhere in the fleet: its spec (:class:`~sage_mq.spec.EngineSpec`,
    fields flat on the wire) under the id it gets."""

    TYPE: ClassVar[str] = "engine.start"
    engine_id: EngineId


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


class LaunchEngine(Message, EngineSpec):
    """Spawn an engine process with exactly these parameters: its spec as placed (``port`` the
    one assigned, ``backend`` resolved, judged by the agent by its node's rules) and where."""

    TYPE: ClassVar[str] = "engine.launch"
    epoch: int = Field(0, ge=0)
    """The epoch of the leader that sent it; agents ignore older ones (0: unfenced)."""
    engine_id: EngineId
    generation: int = Field(ge=1)
    backend: str  # type: ignore[assignment]  # a newer scheduler's backend: the agent says no
    host: str
    port: int = Field(ge=1, le=65535)  # assigned: never None
    gpus: tuple[int, ...] = ()
    use_gpu: bool = False  # resolved: it has GPUs or not
    gpu_memory_utilization: float | None = None
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


class RequestRejected(Message):
    """The scheduler refused a request; ``reason`` says why in words."""

    TYPE: ClassVar[str] = "request.rejected"
    request_id: str
    request_type: str
    engine_id: EngineId | None = None
    reason: str


MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in Message.__subclasses__()}
"""Every message type by its dotted name (all payload classes above)."""
