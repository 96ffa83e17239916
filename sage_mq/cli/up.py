"""``sage llm up``: the whole fleet on this machine, in one command, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sage_mq.agent.runtimes import parse_runtimes
from sage_mq.cli.common import (
    AllowCommand,
    AllowCommandsFrom,
    AllowEngineFlag,
    Insecure,
    LogLevel,
    Runtime,
    allowed_commands,
    console,
    exposed,
    on_signals,
    run,
    setup_logging,
)
from sage_mq.connection import redact_url
from sage_mq.embedded import EmbeddedControlPlane, NodeOptions
from sage_mq.gateway.app import freeze_startup_heap
from sage_mq.settings import (
    ENV_ADMIN_KEY,
    ENV_API_KEY,
    ENV_REDIS_URL,
    GatewayOptions,
    runtimes_from_env,
)


def up(
    preset: Annotated[
        str, typer.Option(help="A built-in preset's name or a preset file.")
    ] = "demo",
    port: Annotated[int, typer.Option(help="The gateway's port.")] = 8000,
    host: Annotated[str, typer.Option(help="The gateway's address.")] = "127.0.0.1",
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar=ENV_REDIS_URL,
            help="Join this Redis instead of starting a private one.",
        ),
    ] = None,
    fake_gpus: Annotated[
        str | None, typer.Option(help="Fake GPU inventory, e.g. 2x24GiB (default: NVML).")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Engine state and logs.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar=ENV_API_KEY, help="Key the inference routes want (Bearer)."),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar=ENV_ADMIN_KEY, help="Key /v1/management wants (Bearer)."),
    ] = None,
    insecure: Insecure = False,
    allow_command: AllowCommand = None,
    allow_commands_from: AllowCommandsFrom = None,
    allow_engine_flag: AllowEngineFlag = None,
    runtime: Runtime = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run Redis, a scheduler, a node agent and the gateway here, and apply a preset; Ctrl-C
    stops every engine and process it started."""
    setup_logging(log_level)
    exposed(host, admin_key, insecure)
    keys = GatewayOptions(api_key=api_key or None, admin_key=admin_key or None)

    async def main() -> int:
        plane = EmbeddedControlPlane(
            redis_url=redis_url,
            host=host,
            port=port,
            fake_gpus=fake_gpus,
            state_dir=state_dir,
            gateway=keys,
            insecure=insecure,
            node=NodeOptions(
                allowed_commands=allowed_commands(allow_command, allow_commands_from),
                allowed_engine_flags=tuple(allow_engine_flag or ()),
                runtimes=parse_runtimes([*runtimes_from_env(), *(runtime or [])]),
            ),
        )
        async with plane:
            on_signals(plane.stop)
            freeze_startup_heap()  # a process that is only sage-mq: see its docstring
            records = await plane.apply(preset)
            where = redact_url(plane.local.url if plane.local else (redis_url or ""))
            console.print(f"[green]sage-mq is up[/green] (preset {preset})", highlight=False)
            console.print(f"  OpenAI API   {plane.gateway_url}", highlight=False)
            console.print(f"  management   http://{host}:{port}/v1/management", highlight=False)
            console.print(f"  Redis        {where}", highlight=False)
            console.print(f"  keys         {_keys_line(keys)}", highlight=False)
            table = Table("ENGINE", "MODEL", "KIND", "STATE", "URL")
            for r in records:
                table.add_row(r.engine_id, r.served_name, r.kind, r.state.value, r.url or "-")
            console.print(table)
            console.print("Ctrl-C stops everything.", highlight=False)
            await plane.run()
            console.print("stopping…", highlight=False)
        return plane.engines_stopped

    count = run(main)
    console.print(f"stopped {count} engine(s) and every process; nothing is left", highlight=False)


def _keys_line(keys: GatewayOptions) -> str:
    if not (keys.api_key or keys.admin_key):
        return "none: open to this machine only (set --admin-key and --api-key to serve others)"
    management = "admin key" if keys.admin_key else "closed (no admin key)"
    return f"inference wants a key; management: {management}"
