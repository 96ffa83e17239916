"""``sage llm engine …``: start, list, stop, restart, logs."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Annotated

import typer
from rich.text import Text

from sage_mq.cli.common import (
    Column,
    EngineIdArg,
    JsonFlag,
    RedisUrl,
    console,
    fail,
    print_fitted,
    print_json,
    run,
    settings_for,
)
from sage_mq.control import ControlPlaneManager
from sage_mq.store import EngineRecord
from sage_mq.wire import Envelope

engine_app = typer.Typer(help="Start, list, stop engines and read their logs.")

_STATE_STYLE = {"RUNNING": "green", "FAILED": "red", "UNHEALTHY": "yellow", "STOPPED": "dim"}


def show_progress(env: Envelope) -> None:
    data = env.payload.model_dump(mode="json")
    hidden = ("engine_id", "argv", "last_lines", "record")
    detail = {k: v for k, v in data.items() if k not in hidden}
    console.print(Text.assemble("  ", (env.type, "cyan"), f" {detail}"))


@engine_app.command("start")
def start(
    model: Annotated[
        str, typer.Argument(help="Model id or path, e.g. Qwen/Qwen2.5-1.5B-Instruct.")
    ],
    engine_kind: Annotated[str, typer.Option("--engine-kind", help="llm or embedding.")] = "llm",
    use_gpu: Annotated[
        bool | None,
        typer.Option("--use-gpu/--no-gpu", help="Default: LLMs on GPU, embeddings on CPU."),
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option("-tp", "--tensor-parallel-size")] = 1,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Fixed port (default: from the node's range)."),
    ] = None,
    node: Annotated[str | None, typer.Option(help="Pin to this node id.")] = None,
    backend: Annotated[
        str | None, typer.Option(help="vllm, llamacpp, embedding, command or fake.")
    ] = None,
    extra_args: Annotated[
        str, typer.Option(help='Extra engine arguments, e.g. "--max-model-len 4096".')
    ] = "",
    required_memory_gb: Annotated[
        float | None, typer.Option(help="Override the memory estimate.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The name clients use (default: the model id or path).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            help="KEY=VALUE for the engine's environment (repeatable); KEY alone passes this "
            "shell's value. Values are never shown or logged.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until RUNNING.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 1800.0,
    json_output: JsonFlag = False,
    redis_url: RedisUrl = None,
) -> None:
    """Start an engine somewhere in the fleet."""
    if engine_kind not in ("llm", "embedding"):
        fail(f"--engine-kind must be llm or embedding, not {engine_kind!r}")
    try:
        args = shlex.split(extra_args)
    except ValueError as exc:
        fail(f"cannot split --extra-args: {exc}")
    variables = env_options(env or [])

    async def main() -> EngineRecord:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.request_engine_startup(
                model,
                engine_kind=engine_kind,
                use_gpu=use_gpu,
                tensor_parallel_size=tensor_parallel_size,
                port=port,
                node=node,
                backend=backend,
                extra_args=args,
                required_memory_gb=required_memory_gb,
                served_model_name=served_model_name,
                env=variables,
                wait=wait,
                timeout=timeout,
                on_event=None if json_output else show_progress,
            )

    _report(run(main), json_output=json_output, waited=wait, requested="start")


def env_options(given: list[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env`` values: ``KEY=VALUE``, or ``KEY`` for the value this shell has (so a token
    need not be typed where shell history keeps it)."""
    environ = os.environ if environ is None else environ
    variables: dict[str, str] = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                fail(f"--env {name}: give KEY=VALUE, or set {name} in this shell to pass its value")
            value = environ[name]
        variables[name] = value
    return variables


def _report(record: EngineRecord, *, json_output: bool, waited: bool, requested: str) -> None:
    """What ``start`` and ``restart`` print."""
    if json_output:
        print_json(record.public())
    elif waited:
        console.print(
            Text.assemble(
                (f"{record.engine_id} RUNNING", "green"),
                f" at {record.url} (generation {record.generation}, restarts {record.restarts})",
            ),
        )
    else:
        console.print(
            f"{requested} of {record.engine_id} requested; follow with `sage llm events --follow`"
        )


@engine_app.command("list")
def list_engines(json_output: JsonFlag = False, redis_url: RedisUrl = None) -> None:
    """Every engine with its state, node, URL and GPUs."""

    async def main() -> list[EngineRecord]:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.list_engines()

    records = run(main)
    if json_output:
        print_json([r.public() for r in records])
        return
    rows: list[list[str | Text]] = [
        [
            r.engine_id,
            r.served_name,
            r.kind,
            r.backend,
            Text(r.state.value, style=_STATE_STYLE.get(r.state.value, "")),
            r.node or "-",
            r.url or "-",
            ",".join(map(str, r.gpus)) or "-",
            str(r.pid or "-"),
            str(r.restarts),
            (r.last_error or "")[:60],
        ]
        for r in records
    ]
    print_fitted(_ENGINE_COLUMNS, rows)


_ENGINE_COLUMNS = (
    Column("ENGINE"),
    Column("MODEL"),
    Column("KIND", 5),
    Column("BACKEND", 6),
    Column("STATE"),
    Column("NODE", 2),
    Column("URL", 1),
    Column("GPUS", 7),
    Column("PID", 8),
    Column("RESTARTS", 4),
    Column("LAST ERROR", 3),
)
"""engine list's columns; on a narrow terminal PID goes first, then GPUS, BACKEND, KIND, …"""


@engine_app.command("stop")
def stop(
    engine_id: EngineIdArg,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until STOPPED.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 60.0,
    json_output: JsonFlag = False,
    redis_url: RedisUrl = None,
) -> None:
    """Stop an engine: SIGTERM, grace, SIGKILL; its GPUs and port are freed."""

    async def main() -> EngineRecord:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.stop_engine(engine_id, wait=wait, timeout=timeout)

    record = run(main)
    if json_output:
        print_json(record.public())
    else:
        console.print(f"{record.engine_id} {record.state.value if wait else 'stop requested'}")


@engine_app.command("restart")
def restart(
    engine_id: EngineIdArg,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the new process is RUNNING.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 1800.0,
    json_output: JsonFlag = False,
    redis_url: RedisUrl = None,
) -> None:
    """Restart an engine as itself: same id, node, port, GPUs and arguments, a new process
    (the old one gets SIGTERM, grace, SIGKILL). A FAILED or STOPPED engine is placed again."""

    async def main() -> EngineRecord:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.restart_engine(
                engine_id,
                wait=wait,
                timeout=timeout,
                on_event=None if json_output else show_progress,
            )

    _report(run(main), json_output=json_output, waited=wait, requested="restart")


@engine_app.command("logs")
def logs(
    engine_id: EngineIdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many lines first.")] = 100,
    redis_url: RedisUrl = None,
) -> None:
    """An engine's log (shipped to Redis by its agent, so readable from any host)."""

    async def main() -> None:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            await cp.get_engine(engine_id)
            key = cp.keys.engine_log(engine_id)
            rows = await cp.bus.history(key, lines)
            for _entry_id, fields in rows:
                typer.echo(fields.get("line", ""))
            cursor = rows[-1][0] if rows else "$"
            if not follow:
                return
            async for entry_id, fields in cp.bus.tail(key, cursor):
                if entry_id:
                    typer.echo(fields.get("line", ""))

    run(main)
