"""``sage llm chat``: one message to a model of the fleet, its answer on stdout."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from sage_mq.cli.common import RedisUrl, fail, settings_for
from sage_mq.errors import SageMQError


def chat(
    model: Annotated[str, typer.Argument(help="A model the fleet serves (see `status`).")],
    prompt: Annotated[str, typer.Argument(help="What to say to it; - reads standard input.")],
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on the answer.")] = None,
    stream: Annotated[bool, typer.Option(help="Print the answer as it comes.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Send one chat message to a model and print its answer: straight to one of its RUNNING
    engines, chosen as the gateway would (the Python client in Redis mode)."""
    from sage_mq.client import UnifiedInferenceClient  # only for this command

    settings = settings_for(redis_url)
    text = sys.stdin.read() if prompt == "-" else prompt
    params = {"max_tokens": max_tokens} if max_tokens else {}
    try:
        with UnifiedInferenceClient.create(
            control_plane_url=settings.redis_url, namespace=settings.namespace
        ) as client:
            if not stream:
                typer.echo(client.chat(text, model=model, **params))
                return
            for piece in client.chat_stream(text, model=model, **params):
                typer.echo(piece, nl=False)
            typer.echo()
    except SageMQError as exc:
        fail(str(exc))
