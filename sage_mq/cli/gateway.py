"""``sage llm gateway run``: the OpenAI-compatible gateway."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
import uvicorn
from uvicorn.supervisors import Multiprocess

from sage_mq.actor import freeze_startup_heap
from sage_mq.cli.common import (
    Insecure,
    LogLevel,
    RedisUrl,
    exposed,
    fail,
    settings_for,
    setup_logging,
)
from sage_mq.connection import check_server_blocking, connect_blocking
from sage_mq.errors import ConfigError, ControlPlaneUnavailable
from sage_mq.gateway import create_app
from sage_mq.gateway.serving import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    GatewayConfig,
    bind_socket,
)
from sage_mq.redis_urls import redact_url
from sage_mq.routing import POLICIES
from sage_mq.settings import ENV_NAMESPACE, ENV_REDIS_URL, GatewayOptions, Settings

gateway_app = typer.Typer(help="The OpenAI-compatible gateway in front of the fleet.")


@gateway_app.command("run")
def gateway_run(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to serve on.")] = 8000,
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
    max_body_mib: Annotated[
        float, typer.Option(help="A request body's limit in MiB (uploads: the largest batch).")
    ] = 32.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request has to arrive, up to its body.")
    ] = HEADER_TIMEOUT_S,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request's body may pause while it is sent.")
    ] = BODY_TIMEOUT_S,
    insecure: Insecure = False,
    redis_url: RedisUrl = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the OpenAI API (/v1/models, chat, completions, embeddings), the management API
    (/v1/management), /health and /metrics."""
    if scheduling_policy not in POLICIES:
        fail(f"--scheduling-policy must be one of {', '.join(POLICIES)}")
    if workers < 1:
        fail("--workers must be at least 1")
    if min(max_body_mib, header_timeout, body_timeout) <= 0:
        fail("--max-body-mib, --header-timeout and --body-timeout must be above 0")
    setup_logging(log_level)
    exposed(host, admin_key, insecure)
    options = GatewayOptions(
        policy=scheduling_policy,
        api_key=api_key,
        admin_key=admin_key,
        max_body_bytes=int(max_body_mib * 1024 * 1024),
    )
    settings = settings_for(redis_url)
    refuse_old_server(settings)
    typer.echo(
        f"gateway on http://{host}:{port} ({workers} process{'es' if workers > 1 else ''}) "
        f"for {redact_url(settings.redis_url)}",
        err=True,
    )
    if workers == 1:
        app: Any = create_app(
            settings,
            policy=options.policy,
            api_key=api_key,
            admin_key=admin_key,
            max_body_bytes=options.max_body_bytes,
        )
        freeze_startup_heap()
    else:  # worker processes build their own app from the environment they inherit
        os.environ.update(
            {ENV_REDIS_URL: settings.redis_url, ENV_NAMESPACE: settings.namespace}
            | options.as_env()
        )
        app = "sage_mq.gateway.app:app_from_env"
    config = GatewayConfig(
        app,
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
    )
    serve(config)


def refuse_old_server(settings: Settings) -> None:
    """One line and exit 1 for a server too old for the fleet, before uvicorn starts (from its
    startup, the same error comes with uvicorn's traceback); an unreachable Redis is the
    gateway's to wait for, as it does."""
    client = connect_blocking(settings, socket_timeout=5)
    try:
        check_server_blocking(client)
    except ConfigError as exc:
        fail(str(exc))
    except ControlPlaneUnavailable:
        pass
    finally:
        client.close()


def serve(config: GatewayConfig) -> None:
    """What ``uvicorn.run`` does with its config (one process, or a supervisor of several), for
    a config of ours. The port is bound here first, so a port taken is one line."""
    try:
        sock = bind_socket(config.host, config.port)
    except ConfigError as exc:
        fail(str(exc))
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        sys.exit(1)  # could not start (the reason is in the log): never a quiet 0
