"""``sage llm worker run``: an rq worker draining the fleet's inference queues."""

from __future__ import annotations

from typing import Annotated

import typer
from redis.exceptions import ConnectionError as RedisConnectionError

from sage_mq.batch import DEFAULT_QUEUES, make_worker
from sage_mq.batch.sweeper import start_sweeper
from sage_mq.batch.worker import DEFAULT_CONCURRENCY
from sage_mq.cli.common import LogLevel, RedisUrl, fail, settings_for
from sage_mq.connection import redact_url
from sage_mq.errors import SageMQError

worker_app = typer.Typer(help="Batch workers (rq) for queued inference.")


@worker_app.command("run")
def worker_run(
    queues: Annotated[
        str, typer.Option(help="Queues to drain, comma-separated, earlier ones first.")
    ] = ",".join(DEFAULT_QUEUES),
    name: Annotated[str | None, typer.Option(help="Worker name (default: rq's own).")] = None,
    burst: Annotated[bool, typer.Option(help="Stop once the queues are empty.")] = False,
    concurrency: Annotated[
        int, typer.Option(help="Requests a job keeps in flight at once.")
    ] = DEFAULT_CONCURRENCY,
    redis_url: RedisUrl = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one worker until SIGINT/SIGTERM (a job in progress is finished first; a second
    signal ends it at once)."""
    settings = settings_for(redis_url)
    try:
        worker = make_worker(settings, queues.split(","), name=name, concurrency=concurrency)
        if log_level.upper() in ("DEBUG", "INFO"):  # up runs its worker at WARNING: quiet
            typer.echo(
                f"worker {worker.name} on {', '.join(worker.queue_names())} "
                f"at {redact_url(settings.redis_url)}",
                err=True,
            )
        start_sweeper(settings)  # chunks whose worker was killed get run again
        worker.work(burst=burst, logging_level=log_level)
    except SageMQError as exc:
        fail(str(exc))
    except RedisConnectionError as exc:
        fail(f"Redis unreachable at {redact_url(settings.redis_url)}: {exc}")
