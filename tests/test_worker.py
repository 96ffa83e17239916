"""``sage llm worker run``: a real rq worker process on a real Redis, JSON on the wire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from sage_mq.batch import make_worker, queue_name, rq_connection
from sage_mq.errors import ConfigError
from sage_mq.settings import ENV_NAMESPACE, ENV_REDIS_URL, Settings
from tests.helpers.servers import Processes, RedisServer


def _queue(settings: Settings) -> Queue:
    conn = rq_connection(settings)
    return Queue(queue_name(settings, "batch"), connection=conn, serializer=JSONSerializer)


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, ENV_REDIS_URL: settings.redis_url, ENV_NAMESPACE: settings.namespace}


def test_a_worker_runs_queued_jobs_with_json_only_and_rq_info_lists_the_queue(
    settings: Settings,
) -> None:
    queue = _queue(settings)
    job = queue.enqueue("operator.add", 2, 3)
    raw = queue.connection.hget(job.key, "data")
    assert json.loads(zlib.decompress(raw))[0] == "operator.add"  # JSON, never pickle

    done = subprocess.run(
        [sys.executable, "-m", "sage_mq", "llm", "worker", "run", "--burst"],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"{settings.namespace}:batch" in done.stderr
    finished = Job.fetch(job.id, connection=queue.connection, serializer=JSONSerializer)
    assert finished.get_status() == JobStatus.FINISHED
    assert finished.return_value() == 5

    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", settings.redis_url, "-Q", "-S", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert f"{settings.namespace}:batch" in info.stdout


def test_a_worker_stops_on_sigterm_after_its_job(settings: Settings, processes: Processes) -> None:
    worker = processes.sage("worker", ["llm", "worker", "run"], _env(settings))
    queue = _queue(settings)
    job = queue.enqueue("time.sleep", 1.0)
    deadline = time.monotonic() + 30
    while job.get_status(refresh=True) != JobStatus.STARTED:
        assert time.monotonic() < deadline, processes.log("worker")
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, processes.log("worker")
    assert job.get_status(refresh=True) == JobStatus.FINISHED  # warm shutdown: the job ended


def test_worker_errors_are_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="at least one queue"):
        make_worker(Settings(), [" ", ""])
    done = subprocess.run(
        [sys.executable, "-m", "sage_mq", "llm", "worker", "run", "--burst"],
        env={**os.environ, ENV_REDIS_URL: "redis://:secret@127.0.0.1:1/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "Redis unreachable" in lines[-1] and "secret" not in done.stderr


def test_a_named_worker_killed_and_started_again_takes_its_name_a_live_ones_is_refused(
    settings: Settings, processes: Processes
) -> None:
    args = ["llm", "worker", "run", "--name", "w-7"]
    first = processes.sage("first", args, _env(settings))
    conn = rq_connection(settings)
    deadline = time.monotonic() + 30
    while not conn.exists("rq:worker:w-7"):
        assert time.monotonic() < deadline, processes.log("first")
        time.sleep(0.05)
    refused = subprocess.run(
        [sys.executable, "-m", "sage_mq", *args, "--burst"],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: a live worker named 'w-7' is registered (host {os.uname().nodename}, "
        f"pid {first.pid}); give this one another --name"
    )
    os.kill(first.pid, signal.SIGKILL)  # its registration stays behind, no death recorded
    first.wait(10)
    again = processes.sage("again", args, _env(settings))
    job = _queue(settings).enqueue("operator.add", 1, 1)
    while job.get_status(refresh=True) != JobStatus.FINISHED:
        assert again.poll() is None, processes.log("again")
        assert time.monotonic() < deadline + 30, processes.log("again")
        time.sleep(0.05)
    assert "its previous run (pid" in processes.log("again")


def test_a_name_left_half_registered_by_a_redis_that_came_back_empty_is_taken(
    settings: Settings,
) -> None:
    conn = rq_connection(settings)
    conn.hset("rq:worker:w-8", "last_heartbeat", "2026-11-25T03:00:00.000000Z")  # as rq beats
    done = subprocess.run(
        [sys.executable, "-m", "sage_mq", "llm", "worker", "run", "--name", "w-8", "--burst"],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "its previous run (its pid lost with Redis' data) is gone; taking its name" in done.stderr
    )


def test_a_worker_outlives_redis_going_away_as_its_job_ends(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    settings = Settings(redis_url=private_redis.url, namespace="outage")
    worker = processes.sage("worker", ["llm", "worker", "run", "--name", "w9"], _env(settings))
    job = _queue(settings).enqueue("time.sleep", 2.0)
    deadline = time.monotonic() + 30
    while job.get_status(refresh=True) != JobStatus.STARTED:
        assert time.monotonic() < deadline, processes.log("worker")
        time.sleep(0.05)
    private_redis.kill()  # the job ends while Redis is away
    time.sleep(4)
    assert worker.poll() is None, processes.log("worker")
    private_redis.start()  # back (empty): the worker goes on under its name
    after = _queue(settings).enqueue("operator.add", 2, 3)
    deadline = time.monotonic() + 30
    while after.get_status(refresh=True) != JobStatus.FINISHED:
        assert time.monotonic() < deadline and worker.poll() is None, processes.log("worker")
        time.sleep(0.1)
    assert "Redis went away as a job ended" in processes.log("worker")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, processes.log("worker")
