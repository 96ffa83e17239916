"""The scheduler: placement policy (pure) and the actor that applies it."""

from sage_mq.scheduler.core import Scheduler

__all__ = ["Scheduler"]
