"""``sage llm up``: the whole fleet on this machine, in one command, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from sage_mq.actor import freeze_startup_heap
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
    fail,
    on_signals,
    run,
    setup_logging,
)
from sage_mq.embedded import EmbeddedControlPlane, NodeOptions
from sage_mq.errors import SageMQError
from sage_mq.fleetfile import UpFleet
from sage_mq.presets import load_preset
from sage_mq.redis_urls import check_redis_url, redact_url
from sage_mq.settings import (
    ENV_ADMIN_KEY,
    ENV_API_KEY,
    ENV_REDIS_URL,
    GatewayOptions,
    runtimes_from_env,
)
from sage_mq.store import EngineRecord


def up(
    preset: Annotated[
        str, typer.Option(help="A built-in preset's name or a preset file.")
    ] = "demo",
    port: Annotated[int, typer.Option(min=0, max=65535, help="The gateway's port.")] = 8000,
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

    try:
        plan = load_preset(preset)  # a bad preset (or URL) is refused before anything starts
        if redis_url:
            check_redis_url(redis_url)
    except SageMQError as exc:
        fail(str(exc))

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
        on_signals(plane.stop)  # while starting too: what started is stopped, nothing is left
        async with plane:
            freeze_startup_heap()  # a process that is only sage-mq: see its docstring
            fleet = None
            if plane.local is not None:  # for the CLI in other shells (see sage_mq.fleetfile)
                settings = plane.settings
                fleet = UpFleet.of_this_process(
                    settings.redis_url, settings.namespace, plane.gateway_url
                )
                fleet.write()
            try:
                records = await plane.apply(plan)
                if not plane.stopping:  # else Ctrl-C came while it started
                    _banner(plane, preset, records, redis_url, keys)
                    await plane.run()
                console.print("stopping…")
            finally:
                if fleet is not None:
                    fleet.remove()
        return plane.engines_stopped

    count = run(main)
    console.print(f"stopped {count} engine(s) and every process; nothing is left")


def _banner(
    plane: EmbeddedControlPlane,
    preset: str,
    records: list[EngineRecord],
    redis_url: str | None,
    keys: GatewayOptions,
) -> None:
    where = redact_url(redis_url or "")
    if plane.local is not None:
        where = f"{plane.local.url} (its own: {plane.local.executable})"
    console.print(Text.assemble(("sage-mq is up", "green"), f" (preset {preset})"))
    for line in (
        f"  OpenAI API   {plane.gateway_url}",
        f"  management   http://{plane.host}:{plane.port}/v1/management",
        f"  Redis        {where}",
        f"  keys         {_keys_line(keys)}",
    ):  # whole lines, never broken inside a URL or path (a log is 80 columns to rich)
        console.print(line, soft_wrap=True)
    table = Table("ENGINE", "MODEL", "KIND", "STATE", "URL")
    for r in records:
        table.add_row(r.engine_id, r.served_name, r.kind, r.state.value, r.url or "-")
    console.print(table)
    console.print("Ctrl-C stops everything.")


def _keys_line(keys: GatewayOptions) -> str:
    if not (keys.api_key or keys.admin_key):
        return "none: open to this machine only (set --admin-key and --api-key to serve others)"
    management = "admin key" if keys.admin_key else "closed (no admin key)"
    return f"inference wants a key; management: {management}"
