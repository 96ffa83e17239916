"""How batches end and how their results come back: expiry when the completion window runs out
(with and without a worker), results as they finish, and the lists of batches and files. Real
gateway, rq worker, scheduler, agent and fake engine processes on a real Redis."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
import redis

from sage_mq import UnifiedInferenceClient
from sage_mq.batch.ending import STUCK_FINALIZING_S
from sage_mq.batch.runner import LEASE_TTL_S
from sage_mq.batch.service import BatchService
from sage_mq.batch.sweeper import sweep
from sage_mq.connection import Redis
from sage_mq.keys import Keys
from sage_mq.settings import Settings
from tests.helpers.batches import batch_under_way, jsonl, wait_batch
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes


def window_ran_out(procs: FleetProcs, batch_id: str) -> None:
    """What 24 hours would do: the batch's expires_at is in the past."""
    with redis.Redis.from_url(procs.env["SAGE_MQ_REDIS_URL"]) as client:
        key = Keys(procs.env["SAGE_MQ_NAMESPACE"]).batch(batch_id)
        client.hset(key, "expires_at", str(int(time.time()) - 1))


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.mark.fleet
def test_a_batch_past_its_window_expires_keeping_what_finished(
    batch_fleet: tuple[FleetProcs, openai.OpenAI],
    processes: Processes,
) -> None:
    procs, client = batch_fleet
    batch_id = batch_under_way(batch_fleet, processes)
    window_ran_out(procs, batch_id)
    done = wait_batch(client, batch_id, {"expired", "completed"}, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    counts = done.request_counts
    assert counts.completed >= 20 and counts.failed > 0
    assert counts.completed + counts.failed == 400
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    every = Counter(line["custom_id"] for line in output + errors)
    assert every == {f"req-{i}": 1 for i in range(400)}  # each request once, in one file


@pytest.mark.fleet
def test_a_batch_no_worker_ever_took_expires_when_read(
    batch_fleet: tuple[FleetProcs, openai.OpenAI],
) -> None:
    procs, client = batch_fleet  # and no worker: nothing will run it, nothing sweeps
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(3))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.retrieve(batch.id).status == "in_progress"
    window_ran_out(procs, batch.id)
    done = client.batches.retrieve(batch.id)
    assert done.status == "expired" and done.output_file_id is None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 3)
    errors = lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-0", "req-1", "req-2"]  # input order
    assert "completion window" in errors[0]["error"]["message"]


@pytest.mark.fleet
def test_results_come_as_requests_finish_and_batches_and_files_are_listed(
    batch_fleet: tuple[FleetProcs, openai.OpenAI],
    processes: Processes,
) -> None:
    procs, client = batch_fleet
    processes.sage("worker", ["llm", "worker", "run", "--concurrency", "1"], procs.env)
    bodies = [
        {"custom_id": f"q{i}", "model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        for i in range(300)
    ]
    gateway_url = str(client.base_url).rstrip("/")
    for url in (gateway_url, procs.env["SAGE_MQ_REDIS_URL"]):
        with UnifiedInferenceClient.create(
            control_plane_url=url, namespace=procs.env["SAGE_MQ_NAMESPACE"]
        ) as ours:
            handle = ours.batch(bodies)
            results = handle.results(timeout=120)
            first = next(results)
            assert handle.status == "in_progress"  # the first result came long before the end
            rest = list(results)
            assert handle.status == "completed"
            assert Counter(r["custom_id"] for r in [first, *rest]) == {
                f"q{i}": 1 for i in range(300)
            }

    batches = client.batches.list(limit=1)
    assert len(batches.data) == 1 and batches.has_more
    newest_first = [b.id for b in client.batches.list(limit=100).data]
    assert len(newest_first) == 2 and newest_first[0] == batches.data[0].id
    assert [b.id for b in client.batches.list(after=newest_first[0]).data] == newest_first[1:]
    files = client.files.list()
    purposes = Counter(f.purpose for f in files.data)
    assert purposes == {"batch": 2, "batch_output": 2}
    assert all(f.purpose == "batch" for f in client.files.list(purpose="batch").data)
    refused = httpx.get(f"{gateway_url}/batches", params={"limit": 0})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"


async def _batch_of(service: BatchService, n: int) -> str:
    upload = await service.records.create_file(jsonl(n), "in.jsonl", "batch")
    batch = await service.create(upload["id"], "/v1/chat/completions")
    return str(batch["id"])


async def _answer_all(service: BatchService, batch_id: str) -> None:
    """What a worker would record: every request answered."""
    for row in await service.records.all_requests(batch_id):
        line = {"custom_id": row["custom_id"], "response": {"status_code": 200}, "error": None}
        assert await service.records.record(batch_id, row["custom_id"], line, True)


async def test_the_sweeper_finishes_endings_a_dead_process_left_half_done(
    settings: Settings, aredis: Redis
) -> None:
    service = BatchService(settings, aredis)
    keys = service.records.keys
    # Died after finishing the last chunk, before finalizing: nothing pending, still in_progress.
    orphan = await _batch_of(service, 3)
    await _answer_all(service, orphan)
    await aredis.delete(keys.batch_pending(orphan))
    # Died in the middle of finalizing, long ago: claimed, never ended.
    stuck = await _batch_of(service, 3)
    await _answer_all(service, stuck)
    await aredis.delete(keys.batch_pending(stuck))
    long_ago = int(time.time()) - STUCK_FINALIZING_S - 1
    await service.records.update_batch(stuck, status="finalizing", finalized=str(long_ago))
    # Finalizing just now (its process is alive and at it): left alone.
    busy = await _batch_of(service, 3)
    await service.records.update_batch(busy, status="finalizing", finalized=str(int(time.time())))

    assert await sweep(service) == []
    for batch_id in (orphan, stuck):
        batch = await service.get(batch_id)
        assert batch["status"] == "completed" and batch["output_file_id"]
        assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert (await service.get(busy))["status"] == "finalizing"
    assert await aredis.smembers(keys.batches_active) == {busy}


async def test_a_chunk_a_worker_took_and_never_ran_runs_again(
    settings: Settings, aredis: Redis
) -> None:
    """rq moves a job to an intermediate list as a worker takes it, then marks it started: a
    worker that dies in between (or a failover that loses the mark, seen in the chaos suite)
    leaves it QUEUED in no queue. The sweeper runs it again once it has been so for a lease's
    time, and not before (its worker may be starting it)."""
    service = BatchService(settings, aredis)
    keys, queue = service.records.keys, service.queue
    batch_id = await _batch_of(service, 3)
    taken = (await aredis.hgetall(keys.batch_jobs(batch_id)))["0"]
    assert await aredis.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT") == taken
    assert await sweep(service) == []  # first seen so: its worker may be starting it now
    assert await sweep(service) == []
    first_seen = queue.intermediate_queue.get_first_seen_key(taken)
    await aredis.set(first_seen, str(time.time() - LEASE_TTL_S - 1))
    assert await sweep(service) == [(batch_id, 0)]
    again = (await aredis.hgetall(keys.batch_jobs(batch_id)))["0"]
    assert again != taken and await aredis.lrange(queue.key, 0, -1) == [again]
    assert await aredis.lrange(queue.intermediate_queue_key, 0, -1) == []
    assert await sweep(service) == []  # the new job waits its turn


async def test_an_outcome_is_recorded_once_whichever_hash_it_went_to(
    settings: Settings, aredis: Redis
) -> None:
    service = BatchService(settings, aredis)
    batch_id = await _batch_of(service, 1)
    failed = {"custom_id": "req-0", "response": None, "error": {"code": "x", "message": "y"}}
    assert await service.records.record(batch_id, "req-0", failed, False)
    # a duplicate run of the chunk that got an answer later: refused, not counted twice
    assert not await service.records.record(batch_id, "req-0", {"custom_id": "req-0"}, True)
    batch = await service.get(batch_id)
    assert batch["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
    assert await service.records.finished(batch_id, 0, 10) == [failed]
