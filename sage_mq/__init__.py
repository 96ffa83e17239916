"""sage-mq: a control plane for fleets of LLM and embedding inference engines, on Redis.

The names below are loaded when first used (PEP 562): ``import sage_mq`` or a client-only
program does not import the agent, the scheduler or the embedded fleet.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_mq.agent import EngineLifecycleManager, NodeAgent
    from sage_mq.bus import Bus
    from sage_mq.client import UnifiedInferenceClient
    from sage_mq.control import ControlPlaneManager
    from sage_mq.errors import SageMQError
    from sage_mq.gpu import GPUResourceManager
    from sage_mq.messages import (
        EngineAdopted,
        EngineExited,
        EngineFailed,
        EngineLaunchFailed,
        EnginePlaced,
        EngineReady,
        EngineRestarting,
        EngineStarting,
        EngineStopped,
        EngineUnhealthy,
        HealthTick,
        LaunchEngine,
        Message,
        NodeHealth,
        NodeJoined,
        NodeLost,
        RequestRejected,
        StartEngine,
        StopEngine,
        TerminateEngine,
    )
    from sage_mq.scheduler import Scheduler
    from sage_mq.settings import AgentSettings, BusSettings, Settings
    from sage_mq.store import EngineRecord, EngineState, NodeRecord
    from sage_mq.wire import Envelope

__version__ = "0.1.0"
_HOME = {
    "sage_mq.agent": ("EngineLifecycleManager", "NodeAgent"),
    "sage_mq.bus": ("Bus",),
    "sage_mq.client": ("UnifiedInferenceClient",),
    "sage_mq.control": ("ControlPlaneManager",),
    "sage_mq.errors": ("SageMQError",),
    "sage_mq.gpu": ("GPUResourceManager",),
    "sage_mq.messages": (
        "EngineAdopted", "EngineExited", "EngineFailed", "EngineLaunchFailed", "EnginePlaced",
        "EngineReady", "EngineRestarting", "EngineStarting", "EngineStopped", "EngineUnhealthy",
        "HealthTick", "LaunchEngine", "Message", "NodeHealth", "NodeJoined", "NodeLost",
        "RequestRejected", "StartEngine", "StopEngine", "TerminateEngine",
    ),
    "sage_mq.scheduler": ("Scheduler",),
    "sage_mq.settings": ("AgentSettings", "BusSettings", "Settings"),
    "sage_mq.store": ("EngineRecord", "EngineState", "NodeRecord"),
    "sage_mq.wire": ("Envelope",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = [  # spelled out for linters and type checkers; a test holds it equal to _HOME's
    "AgentSettings", "Bus", "BusSettings", "ControlPlaneManager", "EngineAdopted",
    "EngineExited", "EngineFailed", "EngineLaunchFailed", "EngineLifecycleManager",
    "EnginePlaced", "EngineReady", "EngineRecord", "EngineRestarting", "EngineStarting",
    "EngineState", "EngineStopped", "EngineUnhealthy", "Envelope", "GPUResourceManager",
    "HealthTick", "LaunchEngine", "Message", "NodeAgent", "NodeHealth", "NodeJoined", "NodeLost",
    "NodeRecord", "RequestRejected", "SageMQError", "Scheduler", "Settings", "StartEngine",
    "StopEngine", "TerminateEngine", "UnifiedInferenceClient",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """``sage_mq.NodeAgent`` and the like, imported from their module on first use."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sage_mq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
