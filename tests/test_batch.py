"""The OpenAI Batch API end to end: the real openai SDK, a gateway, rq worker processes, a
scheduler and an agent with fake engines, all real processes on a real Redis."""

from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter

import openai
import pytest

from sage_mq import UnifiedInferenceClient
from sage_mq.errors import InvalidRequest
from tests.helpers.batches import batch_under_way, jsonl, wait_batch
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import start, wait_for
from tests.helpers.servers import Processes

pytestmark = pytest.mark.fleet


def test_a_batch_of_240_requests_completes_each_custom_id_once(
    batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    procs, client = batch_fleet
    for i in range(2):
        processes.sage(f"worker{i}", ["llm", "worker", "run", "--concurrency", "16"], procs.env)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(240))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 240
    done = wait_batch(client, batch.id, {"completed", "failed"})
    assert done.status == "completed" and done.request_counts.completed == 240
    assert done.request_counts.failed == 0 and done.error_file_id is None
    content = client.files.content(done.output_file_id).content
    assert client.files.retrieve(done.output_file_id).bytes == len(content)
    lines = [json.loads(x) for x in content.decode().splitlines()]
    assert Counter(line["custom_id"] for line in lines) == {f"req-{i}": 1 for i in range(240)}
    first = lines[0]["response"]
    assert first["status_code"] == 200
    assert first["body"]["choices"][0]["message"]["content"] == "[demo] You said: question 0"
    assert client.files.content(uploaded.id).content == jsonl(240)


def test_a_bad_file_fails_the_batch_with_every_line_named_before_any_work(
    batch_fleet: tuple[FleetProcs, openai.OpenAI],
) -> None:
    _, client = batch_fleet
    good = jsonl(3).decode().splitlines()
    bad = [good[0], "{oops", good[0], good[2].replace("/v1/chat/completions", "/v1/embeddings")]
    uploaded = client.files.create(
        file=("bad.jsonl", io.BytesIO("\n".join(bad).encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
    ]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match=r"field .endpoint.: Input should be"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/images",
            completion_window="24h",  # type: ignore[arg-type]
        )


def test_a_cancelled_batch_keeps_what_finished(
    batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    _, client = batch_fleet
    batch_id = batch_under_way(batch_fleet, processes)
    assert client.batches.cancel(batch_id).status in ("cancelling", "cancelled")
    done = wait_batch(client, batch_id, {"cancelled"})
    kept = done.request_counts.completed
    assert 20 <= kept < 400
    output = client.files.content(done.output_file_id).text.splitlines()
    assert len(output) == kept


def test_a_worker_killed_mid_batch_costs_nothing_and_repeats_nothing(
    batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    procs, client = batch_fleet
    victim = processes.sage("victim", ["llm", "worker", "run", "--concurrency", "4"], procs.env)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(300))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 30, 30)
    os.killpg(victim.pid, signal.SIGKILL)  # mid-chunk: its lease lapses, its job stays "started"
    processes.sage("rescuer", ["llm", "worker", "run", "--concurrency", "8"], procs.env)
    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout=120)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (300, 0)
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert Counter(line["custom_id"] for line in lines) == {f"req-{i}": 1 for i in range(300)}
    assert "queueing it again" in processes.log("rescuer")


def test_an_engine_killed_mid_batch_is_waited_for_and_nothing_fails(
    batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    procs, client = batch_fleet
    processes.sage("worker", ["llm", "worker", "run", "--concurrency", "8"], procs.env)
    engine = procs.json("llm", "engine", "list")[0]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(300))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 30, 30)
    os.killpg(int(engine["pid"]), signal.SIGKILL)  # the only replica: requests wait for it
    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout=120)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == (
        "completed",
        300,
        0,
    )
    assert procs.json("llm", "engine", "list")[0]["restarts"] >= 1


def test_the_client_queues_requests_and_batches_through_gateway_and_redis(
    batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    procs, client = batch_fleet
    start(procs, "mini-embed", "--engine-kind", "embedding")
    processes.sage("worker", ["llm", "worker", "run", "--concurrency", "4"], procs.env)
    gateway_url = str(client.base_url).rstrip("/")
    redis_url = procs.env["SAGE_MQ_REDIS_URL"]
    for url in (gateway_url, redis_url):
        with UnifiedInferenceClient.create(
            control_plane_url=url,
            namespace=procs.env["SAGE_MQ_NAMESPACE"],
            default_llm_model="demo",
            default_embedding_model="mini-embed",
        ) as ours:
            job = ours.submit_chat("queued hello")
            assert job.status in ("queued", "running", "finished")
            assert job.result(timeout=60) == "[demo] You said: queued hello"
            assert job.status == "finished"
            vectors = ours.submit_embed(["a", "b"]).result(timeout=60)
            assert [len(v) for v in vectors] == [384, 384]
            bodies = [
                {
                    "custom_id": f"c{i}",
                    "model": "demo",
                    "messages": [{"role": "user", "content": str(i)}],
                }
                for i in range(60)
            ]
            handle = ours.batch(bodies)
            assert handle.progress()["total"] == 60
            results = list(handle.results(timeout=60))
            assert sorted(r["custom_id"] for r in results) == sorted(f"c{i}" for i in range(60))
            assert handle.progress() == {"total": 60, "completed": 60, "failed": 0}
            with pytest.raises(InvalidRequest, match="line 1"):
                ours.batch([{"messages": []}])  # no model: refused before any work
            slow = ours.batch([dict(b, custom_id=f"s{i}") for i, b in enumerate(bodies * 5)])
            slow.cancel()
            assert slow.wait(timeout=60)["status"] == "cancelled"
