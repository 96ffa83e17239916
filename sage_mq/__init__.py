"""sage-mq: a control plane for fleets of LLM and embedding inference engines, on Redis."""

from sage_mq.agent import EngineLifecycleManager, NodeAgent
from sage_mq.bus import Bus
from sage_mq.client import UnifiedInferenceClient
from sage_mq.control import ControlPlaneManager
from sage_mq.errors import SageMQError
from sage_mq.gpu import GPUResourceManager
from sage_mq.messages import (
    AllocateGpus,
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
    GpusAllocated,
    GpusReleased,
    HealthTick,
    LaunchEngine,
    Message,
    NodeHealth,
    NodeJoined,
    NodeLost,
    ReleaseGpus,
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
__all__ = [
    "AgentSettings", "AllocateGpus", "Bus", "BusSettings", "ControlPlaneManager",
    "EngineAdopted", "EngineExited", "EngineFailed", "EngineLaunchFailed",
    "EngineLifecycleManager", "EnginePlaced", "EngineReady", "EngineRecord", "EngineRestarting",
    "EngineStarting", "EngineState", "EngineStopped", "EngineUnhealthy", "Envelope",
    "GPUResourceManager", "GpusAllocated", "GpusReleased", "HealthTick", "LaunchEngine",
    "Message", "NodeAgent", "NodeHealth", "NodeJoined", "NodeLost", "NodeRecord", "ReleaseGpus",
    "RequestRejected", "SageMQError", "Scheduler", "Settings", "StartEngine", "StopEngine",
    "TerminateEngine", "UnifiedInferenceClient",
]  # fmt: skip
