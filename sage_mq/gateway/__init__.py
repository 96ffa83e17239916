"""The OpenAI-compatible gateway in front of every RUNNING engine (``sage llm gateway run``)."""

from sage_mq.gateway.app import create_app

__all__ = ["create_app"]
