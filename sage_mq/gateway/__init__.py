"""The OpenAI-compatible gateway in front of every RUNNING engine (``sage llm gateway run``).

``create_app`` is imported on first use: a client that reads the registry needs none of the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_mq.gateway.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from sage_mq.gateway.app import create_app

        return create_app
    raise AttributeError(f"module 'sage_mq.gateway' has no attribute {name!r}")
