"""``sage llm gateway run``: the OpenAI-compatible gateway."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
import uvicorn

from sage_mq.cli.common import (
    DEFAULT_URL,
    Insecure,
    LogLevel,
    RedisUrl,
    exposed,
    fail,
    settings_for,
    setup_logging,
)
from sage_mq.connection import redact_url
from sage_mq.gateway import create_app
from sage_mq.gateway.app import freeze_startup_heap
from sage_mq.routing import POLICIES
from sage_mq.settings import ENV_NAMESPACE, ENV_REDIS_URL, GatewayOptions

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
    workers: Annotated[
        int, typer.Option(help="Processes serving the port (the gateway is stateless).")
    ] = 1,
    insecure: Insecure = False,
    redis_url: RedisUrl = DEFAULT_URL,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the OpenAI API (/v1/models, chat, completions, embeddings), the management API
    (/v1/management), /health and /metrics."""
    if scheduling_policy not in POLICIES:
        fail(f"--scheduling-policy must be one of {', '.join(POLICIES)}")
    if workers < 1:
        fail("--workers must be at least 1")
    setup_logging(log_level)
    exposed(host, admin_key, insecure)
    options = GatewayOptions(policy=scheduling_policy, api_key=api_key, admin_key=admin_key)
    settings = settings_for(redis_url)
    typer.echo(
        f"gateway on http://{host}:{port} ({workers} process{'es' if workers > 1 else ''}) "
        f"for {redact_url(redis_url)}",
        err=True,
    )
    if workers == 1:
        app: Any = create_app(settings, policy=options.policy, api_key=api_key, admin_key=admin_key)
        freeze_startup_heap()
    else:  # worker processes build their own app from the environment they inherit
        os.environ.update(
            {ENV_REDIS_URL: settings.redis_url, ENV_NAMESPACE: settings.namespace}
            | options.as_env()
        )
        app = "sage_mq.gateway.app:app_from_env"
    uvicorn.run(
        app,
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
    )
