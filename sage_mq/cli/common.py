"""What every CLI command shares: the --redis-url option, settings, errors, signals, output."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from sage_mq.errors import SageMQError
from sage_mq.settings import DEFAULT_REDIS_URL, ENV_REDIS_URL, Settings

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

RedisUrl = Annotated[
    str,
    typer.Option(
        "--redis-url",
        envvar=ENV_REDIS_URL,
        help="Redis holding the fleet (password, ACL user and rediss:// TLS work).",
        show_default=True,
    ),
]
DEFAULT_URL = DEFAULT_REDIS_URL
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output (stable).")]


def settings_for(redis_url: str) -> Settings:
    """Settings from the environment with the URL the command was given."""
    return Settings.from_env(redis_url=redis_url)


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with one clear line on stderr."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine for a command; our errors become one line and a non-zero exit."""
    try:
        return asyncio.run(coro_fn())
    except SageMQError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def on_signals(stop: Callable[[], None]) -> None:
    """SIGINT/SIGTERM only ask the actor to stop (call inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def setup_logging(level: str) -> None:
    """Plain, timestamped logs on stderr for long-running actors."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
