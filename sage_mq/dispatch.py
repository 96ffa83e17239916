"""Typed dispatch: each message type to the one handler that takes it, its payload typed.

An actor lists what it acts on (``handlers.on(StartEngine, placing.on_start)``); the type
checker holds each handler to its message type, so no handler casts or asserts what it got.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sage_mq.messages import Message
from sage_mq.wire import Envelope

M = TypeVar("M", bound=Message)
Handler = Callable[[M, Envelope], Awaitable[None]]
"""Takes a message's payload, and the envelope it came in (its id, type and time)."""


class Handlers:
    """The handlers of one actor, by message type."""

    def __init__(self) -> None:
        self._by_type: dict[type[Message], Callable[[Any, Envelope], Awaitable[None]]] = {}

    def on(self, kind: type[M], handler: Handler[M]) -> Handlers:
        """Send messages of ``kind`` to ``handler`` (one handler per type)."""
        if kind in self._by_type:
            raise ValueError(f"{kind.TYPE} has a handler already")
        self._by_type[kind] = handler
        return self

    async def dispatch(self, env: Envelope) -> bool:
        """Hand the envelope's payload to its handler; False if its type has none."""
        handler = self._by_type.get(type(env.payload))
        if handler is None:
            return False
        await handler(env.payload, env)
        return True
