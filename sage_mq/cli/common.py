"""What every CLI command shares: the --redis-url option, settings, errors, signals, output."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from redis.exceptions import InvalidResponse, RedisError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sage_mq.diagnostics import dump_on_sigusr1
from sage_mq.errors import ConfigError, InvalidRequest, SageMQError
from sage_mq.fleetfile import read_up_fleet
from sage_mq.gateway.auth import check_exposure, is_loopback
from sage_mq.ids import check_id
from sage_mq.redis_urls import check_redis_url
from sage_mq.settings import DEFAULT_REDIS_URL, ENV_REDIS_URL, Settings

T = TypeVar("T")
# No markup: what we print holds users' text (model names, paths, `pip install 'x[extra]'`),
# and rich would eat anything in square brackets. Style comes from Text, never from strings.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        envvar=ENV_REDIS_URL,
        help="Redis holding the fleet (password, ACL user, rediss:// TLS and redis+sentinel:// "
        "work). Default: "
        f"the fleet `sage llm up` runs on this machine, else {DEFAULT_REDIS_URL}.",
        show_default=False,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output (stable).")]
AllowCommand = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-command",
        help="An executable the `command` backend may run here (repeat for more). Without one, "
        "`command` is off: a request never chooses what a node runs. Never a shell or an "
        "interpreter.",
    ),
]
AllowCommandsFrom = Annotated[
    Path | None,
    typer.Option(
        "--allow-commands-from", help="A file of such executables, one a line (# comments)."
    ),
]
Runtime = Annotated[
    list[str] | None,
    typer.Option(
        "--runtime",
        help="BACKEND=PYTHON: run that backend's engines in this interpreter, e.g. "
        "vllm=/opt/venvs/vllm/bin/python (repeat per backend; env SAGE_MQ_RUNTIME_<BACKEND>).",
    ),
]

AllowEngineFlag = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-engine-flag",
        help="A gated engine flag requests may use here, e.g. --trust-remote-code (repeat for "
        "more; gated flags load code or touch files the request names).",
    ),
]


EX_CONFIG = 78
"""Exit status of a refusal to start as configured (sysexits' EX_CONFIG): service managers
should not restart it (the gateway's systemd unit has ``RestartPreventExitStatus=78``)."""
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Serve beyond loopback with no admin key (anyone who reaches the port can start "
        "and stop engines). Refused without this flag.",
    ),
]


def exposed(host: str, admin_key: str | None, insecure: bool) -> None:
    """Exit if serving on ``host`` needs an admin key that is missing; say so loudly when
    ``--insecure`` overrides that."""
    try:
        check_exposure(host, admin_key, insecure=insecure)
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    if insecure and not admin_key and not is_loopback(host):
        err_console.print(
            Text.assemble(
                ("INSECURE:", "bold red"),
                f" serving on {host} with no admin key: anyone who reaches this port can start, "
                "stop and reconfigure engines",
            ),
            soft_wrap=True,
        )


def allowed_commands(names: list[str] | None, listing: Path | None) -> tuple[str, ...]:
    """``--allow-command`` values and the lines of ``--allow-commands-from``."""
    found = list(names or ())
    if listing is not None:
        try:
            text = listing.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--allow-commands-from {listing}: cannot read it: {exc}")
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                found.append(entry)
    return tuple(found)


def _engine_id(value: str) -> str:
    try:
        return check_id("engine id", value)
    except InvalidRequest as exc:
        raise typer.BadParameter(str(exc)) from None


EngineIdArg = Annotated[
    str, typer.Argument(help="Engine id (see `engine list`).", callback=_engine_id)
]


def checked_node_id(node_id: str) -> str:
    """The node id, or exit with what a node id looks like."""
    try:
        return check_id("node id", node_id)
    except InvalidRequest as exc:
        fail(f"--node-id: {exc}")


def settings_for(redis_url: str | None) -> Settings:
    """Settings for the fleet the command is about (see :func:`fleet_for`)."""
    return fleet_for(redis_url)[0]


def fleet_for(redis_url: str | None) -> tuple[Settings, str]:
    """The fleet's settings, and where its URL came from: the URL given (``--redis-url`` or
    ``SAGE_MQ_REDIS_URL``), else the fleet a running ``sage llm up`` wrote down here, else the
    default."""
    if redis_url:
        try:
            check_redis_url(redis_url)
        except ConfigError as exc:
            fail(str(exc))
        return Settings.from_env(redis_url=redis_url), "given"
    up = read_up_fleet()
    if up is not None:
        settings = Settings(redis_url=up.redis_url, namespace=up.namespace)
        return settings, f"the fleet of `sage llm up` (pid {up.pid})"
    return Settings.from_env(redis_url=DEFAULT_REDIS_URL), "the default"


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with one clear line on stderr."""
    err_console.print(Text.assemble(("error:", "red"), f" {message}"), soft_wrap=True)
    raise typer.Exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine for a command; our errors become one line and a non-zero exit."""
    try:
        return asyncio.run(coro_fn())
    except SageMQError as exc:
        fail(str(exc))
    except InvalidResponse as exc:  # what redis_errors did not see
        fail(f"what answered at the Redis URL is not Redis ({exc}): check its host and port")
    except RedisError as exc:
        fail(f"Redis: {exc}")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def on_signals(stop: Callable[[], None]) -> None:
    """SIGINT/SIGTERM only ask the actor to stop; SIGUSR1 writes what it is doing to its log
    (see :mod:`sage_mq.diagnostics`). Call inside the running loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    dump_on_sigusr1(loop)


def setup_logging(level: str) -> None:
    """Plain, timestamped logs on stderr for long-running actors."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Column:
    """A table column: its header, and how soon it gives way on a narrow terminal (0: never)."""

    header: str
    drop_order: int = 0


def print_fitted(columns: Sequence[Column], rows: Sequence[Sequence[str | Text]]) -> None:
    """A table that fits the terminal: whole cells (ids and URLs are never cut), and the
    columns that give way first left out, with a line that says which."""
    widths = [len(c.header) for c in columns]
    for row in rows:
        widths = [max(w, Text(cell).cell_len if isinstance(cell, str) else cell.cell_len)
                  for w, cell in zip(widths, row, strict=True)]  # fmt: skip
    shown = list(range(len(columns)))
    droppable = sorted((c.drop_order, i) for i, c in enumerate(columns) if c.drop_order)
    while sum(widths[i] + 3 for i in shown) + 1 > console.width and droppable:
        shown.remove(droppable.pop()[1])
    table = Table(*(columns[i].header for i in shown))
    for column in table.columns:
        column.overflow = "fold"  # wrapped, never "…"
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    hidden = [c.header for i, c in enumerate(columns) if i not in shown]
    if hidden:
        console.print(f"({', '.join(hidden)} left out at this width; --json shows everything)")


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
