"""``sage llm scheduler run`` and ``sage llm node run``: the long-running actors."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from sage_mq.actor import freeze_startup_heap
from sage_mq.agent.node import NodeAgent
from sage_mq.agent.runtimes import parse_runtimes
from sage_mq.cli.common import (
    AllowCommand,
    AllowCommandsFrom,
    AllowEngineFlag,
    LogLevel,
    RedisUrl,
    Runtime,
    allowed_commands,
    checked_node_id,
    on_signals,
    run,
    settings_for,
    setup_logging,
)
from sage_mq.errors import ConfigError
from sage_mq.gpu import GPUResourceManager
from sage_mq.redis_urls import redact_url, url_secrets
from sage_mq.scheduler.core import Scheduler
from sage_mq.settings import (
    AgentSettings,
    RestartPolicy,
    SchedulerSettings,
    default_state_dir,
    engine_base_env,
    fake_gpus_from_env,
    runtimes_from_env,
)

scheduler_app = typer.Typer(help="The scheduler: places engines, keeps records in step.")
node_app = typer.Typer(help="The node agent: runs engines on this host.")


@scheduler_app.command("run")
def scheduler_run(
    redis_url: RedisUrl = None,
    name: Annotated[str | None, typer.Option(help="Consumer name (default host-pid).")] = None,
    health_interval: Annotated[float, typer.Option(help="Seconds between health ticks.")] = 2.0,
    probe_timeout: Annotated[float, typer.Option(help="Seconds one health probe may take.")] = 1.0,
    lease_ttl: Annotated[
        float, typer.Option(help="Leader lease TTL: a standby takes over this long after.")
    ] = 5.0,
    auto_restart: Annotated[bool, typer.Option(help="Restart engines that fail.")] = True,
    max_restart_attempts: Annotated[int, typer.Option(help="Attempts before FAILED.")] = 3,
    failure_threshold: Annotated[int, typer.Option(help="Failed probes before a restart.")] = 3,
    backoff_base: Annotated[float, typer.Option(help="Delay = base * 2**(attempt-1) s.")] = 1.0,
    stability_window: Annotated[
        float, typer.Option(help="Seconds RUNNING that reset the attempt counter.")
    ] = 60.0,
    node_lost_grace: Annotated[
        float,
        typer.Option(
            help="Seconds a lost node's engines stay put (and keep serving) before they move."
        ),
    ] = 60.0,
    log_level: LogLevel = "INFO",
) -> None:
    """Run a scheduler until SIGINT/SIGTERM."""
    setup_logging(log_level)
    settings = settings_for(redis_url)
    policy = RestartPolicy(
        auto_restart=auto_restart,
        max_restart_attempts=max_restart_attempts,
        failure_threshold=failure_threshold,
        backoff_base_s=backoff_base,
        stability_window_s=stability_window,
    )
    healing = SchedulerSettings(
        health_interval_s=health_interval,
        probe_timeout_s=probe_timeout,
        lease_ttl_s=lease_ttl,
        node_lost_grace_s=node_lost_grace,
        policy=policy,
    )

    async def main() -> None:
        async with Scheduler(settings, name=name, scheduler=healing) as scheduler:
            on_signals(scheduler.stop)
            freeze_startup_heap()
            typer.echo(f"scheduler {scheduler.name} on {redact_url(settings.redis_url)}", err=True)
            await scheduler.run()

    run(main)


def _port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in text.split("-", 1))
    except ValueError:
        raise ConfigError(
            f"bad --port-range {text!r}: expected LOW-HIGH, e.g. 40000-40999"
        ) from None
    if not 1 <= low <= high <= 65535:
        raise ConfigError(f"bad --port-range {text!r}: need 1 ≤ LOW ≤ HIGH ≤ 65535")
    return low, high


@node_app.command("run")
def node_run(
    node_id: Annotated[str, typer.Option("--node-id", help="Unique id of this node.")] = "",
    advertise_address: Annotated[
        str, typer.Option(help="Address engines bind to and clients use.")
    ] = "127.0.0.1",
    fake_gpus: Annotated[
        str | None, typer.Option(help="Fake GPU inventory, e.g. 2x80GiB or 80GiB,24GiB.")
    ] = None,
    port_range: Annotated[str, typer.Option(help="Engine ports, LOW-HIGH.")] = "40000-40999",
    state_dir: Annotated[Path | None, typer.Option(help="Engine state and logs.")] = None,
    liveness_ttl: Annotated[float, typer.Option(help="Seconds the liveness key lives.")] = 5.0,
    stop_grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
    allow_command: AllowCommand = None,
    allow_commands_from: AllowCommandsFrom = None,
    allow_engine_flag: AllowEngineFlag = None,
    runtime: Runtime = None,
    redis_url: RedisUrl = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run this host's node agent until SIGINT/SIGTERM (its engines keep running)."""
    setup_logging(log_level)
    settings = settings_for(redis_url)
    node = checked_node_id(node_id or socket.gethostname())
    commands = allowed_commands(allow_command, allow_commands_from)
    runtimes = parse_runtimes([*runtimes_from_env(), *(runtime or [])])

    async def main() -> None:
        agent_settings = AgentSettings(
            node_id=node,
            advertise_address=advertise_address,
            port_range=_port_range(port_range),
            state_dir=state_dir or default_state_dir(),
            liveness_ttl_s=liveness_ttl,
            stop_grace_s=stop_grace,
            allowed_commands=commands,
            allowed_engine_flags=tuple(allow_engine_flag or ()),
            runtimes=runtimes,
        )
        gpus = GPUResourceManager.detect(fake_gpus or fake_gpus_from_env())
        base_env = engine_base_env(secrets=url_secrets(settings.redis_url))
        agent = NodeAgent(settings, agent_settings, gpus=gpus, base_env=base_env)
        async with agent:
            on_signals(agent.stop)
            freeze_startup_heap()
            typer.echo(
                f"node agent {node} ({len(gpus.gpus())} GPUs) on {redact_url(settings.redis_url)}",
                err=True,
            )
            await agent.run()

    run(main)
