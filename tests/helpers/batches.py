"""Batches through the OpenAI SDK: an input file, waiting for an outcome, one under way."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import wait_for
from tests.helpers.servers import Processes


def jsonl(n: int, model: str = "demo", url: str = "/v1/chat/completions") -> bytes:
    rows = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
        for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def wait_batch(client: openai.OpenAI, batch_id: str, until: set[str], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch still {batch.status}: {batch.request_counts}")


def batch_under_way(fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes) -> str:
    """A batch of 400 requests with one slow worker on it, 20 of them done."""
    procs, client = fleet
    processes.sage("worker", ["llm", "worker", "run", "--concurrency", "2"], procs.env)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(400))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20, 30)
    return batch.id
