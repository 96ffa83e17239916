"""``sage llm worker run``: an rq worker draining the fleet's inference queues."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Annotated

import typer
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.worker import SimpleWorker

from sage_mq.batch import DEFAULT_QUEUES, make_worker
from sage_mq.batch.sweeper import start_sweeper
from sage_mq.batch.worker import DEFAULT_CONCURRENCY
from sage_mq.cli.common import LogLevel, RedisUrl, fail, settings_for
from sage_mq.errors import SageMQError
from sage_mq.redis_urls import redact_url

worker_app = typer.Typer(help="Batch workers (rq) for queued inference.")
log = logging.getLogger(__name__)


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
    names = queues.split(",")
    try:
        worker = make_worker(settings, names, name=name, concurrency=concurrency)
        if log_level.upper() in ("DEBUG", "INFO"):  # up runs its worker at WARNING: quiet
            typer.echo(
                f"worker {worker.name} on {', '.join(worker.queue_names())} "
                f"at {redact_url(settings.redis_url)}",
                err=True,
            )
        start_sweeper(settings)  # chunks whose worker was killed get run again
        while not _worked(worker, burst, log_level):  # Redis went away under a job
            _wait_for_redis(worker.connection)
            worker = make_worker(settings, names, name=worker.name, concurrency=concurrency)
    except SageMQError as exc:
        fail(str(exc))
    except RedisConnectionError as exc:
        fail(f"Redis unreachable at {redact_url(settings.redis_url)}: {exc}")


def _worked(worker: SimpleWorker, burst: bool, log_level: str) -> bool:
    """Run the worker; True when it ended as asked, False when Redis went away while it
    finished a job (rq waits for Redis between jobs, not there)."""
    try:
        worker.work(burst=burst, logging_level=log_level)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        if _asked_to_stop(worker):
            log.warning("worker %s: stopped; Redis could not be told (%s)", worker.name, exc)
            return True  # asked to stop: stop, whatever Redis did meanwhile
        return _went_away(worker, exc)
    if burst or _asked_to_stop(worker):
        return True
    # rq's loop logs an error it did not expect ("found an unhandled exception, quitting")
    # and returns: seen when Redis was killed as a job ended (chaos suite)
    return _went_away(worker, "its work loop ended on an error")


def _asked_to_stop(worker: SimpleWorker) -> bool:
    """Whether a signal asked the worker to stop (rq's mark)."""
    return getattr(worker, "_shutdown_requested_date", None) is not None


def _went_away(worker: SimpleWorker, why: object) -> bool:
    log.warning(
        "worker %s: Redis went away as a job ended (%s); waiting for it, then going on "
        "under the same name (the sweeper runs that job's chunk again)",
        worker.name,
        why,
    )
    return False


def _wait_for_redis(connection: Redis, poll_s: float = 1.0) -> None:
    """Until Redis answers; SIGTERM and Ctrl-C end the wait (rq's handlers are not ours)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            if connection.ping():
                return
        time.sleep(poll_s)
