"""The node agent: engine processes on one host, and the actor that runs them."""

from sage_mq.agent.lifecycle import EngineLifecycleManager, ManagedEngine
from sage_mq.agent.node import NodeAgent

__all__ = ["EngineLifecycleManager", "ManagedEngine", "NodeAgent"]
