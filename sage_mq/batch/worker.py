"""rq workers for queued inference.

Queues are named under the fleet's namespace (``sage:batch`` → rq's key ``rq:queue:sage:batch``),
so ``rq info --url URL`` lists them beside any other rq queues. Jobs and results are JSON
(:class:`rq.serializers.JSONSerializer`): a job can name a function and pass plain data, never a
pickled object, so a worker runs only code that is installed on its host.

Workers are :class:`rq.SimpleWorker`: a job runs in the worker's own process, with no fork per
job (rq's fork costs more than a short inference job); a job that outlives its timeout is ended
by rq's alarm as with a forking worker.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

import psutil
import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from sage_mq.connection import check_server_blocking, connect_blocking
from sage_mq.errors import ConfigError
from sage_mq.keys import Keys
from sage_mq.settings import Settings

log = logging.getLogger(__name__)
DEFAULT_QUEUES = ("batch",)
DEFAULT_CONCURRENCY = 32
"""Requests a job has in flight at once (async HTTP inside the job)."""
_current: tuple[Settings, int] | None = None


def worker_settings() -> tuple[Settings, int]:
    """The settings and concurrency of this worker process (jobs run inside it); a plain
    ``rq worker`` gets them from the environment."""
    return _current or (Settings.from_env(), DEFAULT_CONCURRENCY)


def batch_queue(settings: Settings, connection: redis.Redis | None = None) -> Queue:
    """The queue batch chunks go to."""
    conn = connection or rq_connection(settings)
    return Queue(queue_name(settings, "batch"), connection=conn, serializer=JSONSerializer)


def queue_name(settings: Settings, name: str) -> str:
    """The rq queue name for one of our queues, e.g. ``sage:batch``."""
    return Keys(settings.namespace).queue(name)


def rq_connection(settings: Settings) -> redis.Redis:
    """A synchronous client, as rq wants (bytes replies; TLS, password, ACL and Sentinel from
    the URL). No read timeout here: rq sets one longer than its blocking dequeue."""
    return connect_blocking(settings)


def make_worker(
    settings: Settings,
    queues: Sequence[str] = DEFAULT_QUEUES,
    *,
    name: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> SimpleWorker:
    """A worker over our queues (in the order given: earlier queues first)."""
    global _current
    names = [q.strip() for q in queues if q.strip()]
    if not names:
        raise ConfigError("give at least one queue (e.g. --queues batch)")
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    _current = (settings, concurrency)
    conn = rq_connection(settings)
    check_server_blocking(conn)
    rq_queues = [
        Queue(queue_name(settings, q), connection=conn, serializer=JSONSerializer) for q in names
    ]
    worker = SimpleWorker(rq_queues, name=name, connection=conn, serializer=JSONSerializer)
    if name is not None:
        take_name_of_dead_worker(worker)
    return worker


def take_name_of_dead_worker(worker: SimpleWorker) -> None:
    """A worker started again under its old name (systemd's ``--name %H-%i`` after a kill -9)
    finds its previous run still registered; rq would refuse the name for up to 7 minutes. A
    registration of this host whose process is gone is marked dead (the sweeper runs its chunk
    again); one of a live process, or of another host, is refused, saying so. A registration
    with no host (Redis came back empty, and rq's heartbeats wrote only ``last_heartbeat``)
    names no process to ask: it is taken. All of it read through rq's own worker API."""
    stale = SimpleWorker.find_by_key(worker.key, connection=worker.connection)
    if stale is None or stale.death_date is not None:
        return  # none, or dead already
    hostname, pid = stale.hostname, stale.pid
    if hostname is None and stale.last_heartbeat is None:
        return  # a registration that says nothing: as good as none
    ours = pid == os.getpid()  # this process's worker, before Redis went away under it
    if hostname is not None and (
        hostname != socket.gethostname() or (pid and not ours and psutil.pid_exists(pid))
    ):
        raise ConfigError(
            f"a live worker named {worker.name!r} is registered (host {hostname}, pid {pid}); "
            "give this one another --name"
        )
    stale.register_death()  # type: ignore[no-untyped-call]
    was = f"pid {pid}" if pid else "its pid lost with Redis' data"
    log.warning("worker %s: its previous run (%s) is gone; taking its name", worker.name, was)
