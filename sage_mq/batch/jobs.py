"""The functions rq workers run (named in jobs by their dotted path, never pickled)."""

from __future__ import annotations

import asyncio
from typing import Any

from sage_mq.batch.runner import run_chunk
from sage_mq.batch.worker import worker_settings


def run_batch_chunk(batch_id: str, number: int) -> dict[str, Any]:
    """One chunk of a batch (see :func:`sage_mq.batch.runner.run_chunk`)."""
    settings, concurrency = worker_settings()
    return asyncio.run(run_chunk(settings, batch_id, number, concurrency=concurrency))
