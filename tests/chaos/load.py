"""Steady mixed load through the gateway while faults land: chat and embeddings in background
threads, a batch per round, and start/stop requests."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from typing import Any

import httpx
import openai

from tests.chaos.checks import CHAT, batch_problems
from tests.chaos.harness import ChaosFleet
from tests.helpers.batches import jsonl

BATCH_SIZE = 600


class Load:
    """Threads that keep asking the gateway for chat and embeddings, counting the answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._ask, args=("chat/completions", CHAT), daemon=True),
            threading.Thread(
                target=self._ask,
                args=("embeddings", {"model": "mini", "input": ["chaos"]}),
                daemon=True,
            ),
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _ask(self, route: str, body: dict[str, Any]) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                try:
                    status = str(http.post(f"{self.url}/v1/{route}", json=body).status_code)
                except httpx.TransportError:
                    status = "no answer"
                self.answers[f"{route.split('/')[0]} {'ok' if status == '200' else status}"] += 1
                self._stop.wait(0.05)

    def take(self) -> Counter[str]:
        """The answers counted since the last take."""
        taken, self.answers = self.answers, Counter()
        return taken


class Batches:
    """One OpenAI batch per round, through the gateway, checked for exactly-once results."""

    def __init__(self, fleet: ChaosFleet) -> None:
        self.client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none", max_retries=3)
        self.custom_ids = [f"req-{i}" for i in range(BATCH_SIZE)]  # as jsonl() names them

    def submit(self) -> str:
        data = io.BytesIO(jsonl(BATCH_SIZE))
        uploaded = self.client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = self.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        return batch.id

    def done(self, batch_id: str) -> int:
        """Requests with an outcome so far."""
        counts = self.client.batches.retrieve(batch_id).request_counts
        return 0 if counts is None else counts.completed + counts.failed

    def finished(self, batch_id: str, timeout: float = 180) -> list[str]:
        """Wait for the batch to end; what is wrong with its results."""
        deadline = time.monotonic() + timeout
        while (batch := self._retrieve(batch_id)).status not in {"completed", "failed"}:
            if time.monotonic() > deadline:
                return [f"batch {batch_id} still {batch.status} after {timeout:.0f} s"]
            time.sleep(0.5)
        lines = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                text = self.client.files.content(file_id).text
                lines += [json.loads(line) for line in text.splitlines()]
        return batch_problems(batch, lines, self.custom_ids)

    def _retrieve(self, batch_id: str) -> Any:
        for _ in range(20):  # the gateway may be the process just killed
            try:
                return self.client.batches.retrieve(batch_id)
            except openai.APIConnectionError:
                time.sleep(0.5)
        return self.client.batches.retrieve(batch_id)
