"""``sage llm gateway run``: the OpenAI-compatible gateway."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from sage_mq.cli.common import DEFAULT_URL, LogLevel, RedisUrl, fail, settings_for, setup_logging
from sage_mq.connection import redact_url
from sage_mq.gateway import create_app
from sage_mq.routing import POLICIES

gateway_app = typer.Typer(help="The OpenAI-compatible gateway in front of the fleet.")


@gateway_app.command("run")
def gateway_run(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    scheduling_policy: Annotated[
        str, typer.Option(help="adaptive, round_robin, least_loaded or random.")
    ] = "adaptive",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SAGE_MQ_API_KEY", help="Key the inference routes want (Bearer)."),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="SAGE_MQ_ADMIN_KEY", help="Key /v1/management wants (Bearer)."),
    ] = None,
    redis_url: RedisUrl = DEFAULT_URL,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the OpenAI API (/v1/models, chat, completions, embeddings), the management API
    (/v1/management), /health and /metrics."""
    if scheduling_policy not in POLICIES:
        fail(f"--scheduling-policy must be one of {', '.join(POLICIES)}")
    setup_logging(log_level)
    app = create_app(
        settings_for(redis_url), policy=scheduling_policy, api_key=api_key, admin_key=admin_key
    )
    typer.echo(f"gateway on http://{host}:{port} for {redact_url(redis_url)}", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
