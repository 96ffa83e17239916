"""Batch throughput: the same requests straight to an engine, and through the batch queue.

Real processes on a private Redis: a scheduler, a node agent, one fake engine (`--backend fake`,
answering in ``--engine-latency-ms``) and two ``sage llm worker run`` workers. The same N chat
requests are sent (a) directly, by an async client keeping C requests in flight, and (b) as one
batch through the queue (``UnifiedInferenceClient.batch`` in Redis mode, which is what the
gateway's Batch API does too). Prints the throughput ratio (queued / direct) and the time to the
first result each way, and writes JSON. Target: the queue reaches ≥ 50 % of direct throughput.

    python benchmarks/batch_throughput.py [--requests 2000] [--concurrency 64]
        [--engine-latency-ms 20] [--out benchmarks/results/batch_throughput.json]
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cli import finish, parser_for
from benchmarks._fleet import Fleet
from benchmarks._redis import redis_server
from sage_mq import UnifiedInferenceClient


def _body(i: int) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": f"question {i}"}]}


async def direct(
    url: str, n: int, concurrency: int, body: Callable[[int], dict[str, Any]] = _body
) -> dict[str, float]:
    """(a): an async client, ``concurrency`` requests in flight, one connection each."""
    todo = iter(range(n))
    first: list[float] = []
    clients = [httpx.AsyncClient(timeout=120) for _ in range(concurrency)]
    started = time.perf_counter()

    async def one_client(client: httpx.AsyncClient) -> None:
        for i in todo:
            (await client.post(url, json=body(i))).raise_for_status()
            if not first:
                first.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(one_client(c) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "rps": round(n / seconds, 1),
        "first_s": round(first[0], 3),
    }


def queued(
    redis_url: str, namespace: str, n: int, body: Callable[[int], dict[str, Any]] = _body
) -> dict[str, float]:
    """(b): one batch of ``n`` requests through the queue and the workers."""
    os.environ["SAGE_MQ_NAMESPACE"] = namespace
    with UnifiedInferenceClient.create(control_plane_url=redis_url) as client:
        started = time.perf_counter()
        handle = client.batch([body(i) | {"custom_id": f"r{i}"} for i in range(n)])
        first = 0.0
        while True:
            batch = handle.refresh()
            if not first and batch["request_counts"]["completed"]:
                first = time.perf_counter() - started
            if batch["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        counts = batch["request_counts"]
        if batch["status"] != "completed" or counts["completed"] != n:
            raise RuntimeError(f"the batch ended {batch['status']} with {counts}")
    return {"seconds": round(seconds, 3), "rps": round(n / seconds, 1), "first_s": round(first, 3)}


def main(n: int, concurrency: int, latency_ms: float) -> dict[str, Any]:
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(url, Path(tmp))
        try:
            fleet.start_scheduler_and_node()
            extra = ["--extra-args", f"--latency-ms {latency_ms}"] if latency_ms else []
            record = fleet.cli(
                "engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait", *extra
            )
            per_worker = str(max(1, concurrency // 2))
            for name in ("w1", "w2"):
                fleet.start(
                    name, "worker", "run", "--concurrency", per_worker, "--log-level", "WARNING"
                )
            engine = f"{record['url']}/v1/chat/completions"
            asyncio.run(direct(engine, min(n, 200), concurrency))  # warm up
            a = asyncio.run(direct(engine, n, concurrency))
            b = queued(url, fleet.env["SAGE_MQ_NAMESPACE"], n)
        finally:
            fleet.close()
    return {
        "benchmark": "batch_throughput",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "requests": n,
        "concurrency": concurrency,
        "engine_latency_ms": latency_ms,
        "workers": 2,
        "direct": a,
        "queued": b,
        "throughput_ratio": round(b["rps"] / a["rps"], 3),
        "target_ratio": 0.5,
    }


def _print(r: dict[str, Any]) -> None:
    print(
        f"{r['requests']} chat requests, engine answering in {r['engine_latency_ms']} ms, "
        f"{r['concurrency']} in flight"
    )
    for side in ("direct", "queued"):
        s = r[side]
        print(f"  {side:7} {s['rps']:>8} req/s  {s['seconds']:>7} s  first result {s['first_s']} s")
    print(f"throughput ratio {r['throughput_ratio']} (target ≥ {r['target_ratio']})")


if __name__ == "__main__":
    parser = parser_for(__doc__, "batch_throughput")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--engine-latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    finish(main(args.requests, args.concurrency, args.engine_latency_ms), args.out, _print)
