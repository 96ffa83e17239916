"""The scheduler: placement policy (pure) and the actor that applies it.

``Scheduler`` is imported on first use: the policy alone (``placement``) needs none of the actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_mq.scheduler.core import Scheduler

__all__ = ["Scheduler"]


def __getattr__(name: str) -> Any:
    if name == "Scheduler":
        from sage_mq.scheduler.core import Scheduler

        return Scheduler
    raise AttributeError(f"module 'sage_mq.scheduler' has no attribute {name!r}")
