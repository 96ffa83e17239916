"""What the gateway and the client's Redis mode cost, against calling the engine directly.

Real processes on a private Redis: a scheduler, a node agent, one fake engine (`--backend fake`,
no model: the engine's own time is small, so the overhead shows) and `sage llm gateway run`.
Each measurement sends the same requests both ways, in alternating blocks so that drift hits
both sides alike:

(a) under load: C concurrent clients (default 64), N chat requests (default 5,000) per side,
    straight to the engine's URL and through the gateway: throughput ratio, latency p50/p99
    each way, and what the gateway added;
(b) one request at a time (no queueing): the latency the gateway adds, p50/p99;
(c) ``UnifiedInferenceClient`` in Redis mode (reads the registry, calls the engine itself) vs
    an ``httpx.Client`` posting to the engine's URL, one request at a time: overhead in %.

Targets: (a) ≥ 80 % of direct throughput, (b) p50 ≤ 1 ms and p99 ≤ 5 ms added, (c) ≤ 5 %.
For scale: LiteLLM's proxy documents 2-12 ms p50 added per request.

    python benchmarks/gateway_overhead.py [--requests 5000] [--concurrency 64]
        [--engine-latency-ms 0] [--gateway-workers 1]
        [--out benchmarks/results/gateway_overhead.json]

With ``--engine-latency-ms 0`` the engine answers at once: what is measured is pure overhead,
and on a small machine the load generator, the gateway and the engine compete for the same
cores, so (a) shows CPU sharing as much as the gateway. A real engine takes tens of ms or more
per answer; ``--engine-latency-ms 50`` shows the gateway's share of such a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cli import finish, parser_for
from benchmarks._fleet import Fleet
from benchmarks._redis import percentile, redis_server
from sage_mq import UnifiedInferenceClient

BODY = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}
ANCHOR = "LiteLLM proxy: 2-12 ms p50 added (its docs)"


def _stats(ms: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(ms, 50), 3),
        "p99": round(percentile(ms, 99), 3),
        "n": len(ms),
    }


async def _load(
    url: str, n: int, concurrency: int, body: dict[str, Any] = BODY
) -> tuple[list[float], float]:
    """``n`` chat requests from ``concurrency`` clients; (latencies in ms, seconds taken).

    Each client has its own ``httpx.AsyncClient``: one client's pool shared by 64 connections
    costs the load generator several ms of CPU per request (httpcore's pool work grows with
    the square of its connections), which would cap both sides alike.
    """
    latencies: list[float] = []
    todo = iter(range(n))
    clients = [httpx.AsyncClient(timeout=60) for _ in range(concurrency)]

    async def one_client(client: httpx.AsyncClient) -> None:
        for _ in todo:
            started = time.perf_counter()
            response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        todo = iter(range(concurrency))  # warm up: one connection each
        await asyncio.gather(*(one_client(c) for c in clients))
        latencies.clear()
        todo = iter(range(n))
        with _no_collection():
            started = time.perf_counter()
            await asyncio.gather(*(one_client(c) for c in clients))
            return latencies, time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No garbage collection in the load generator while a block is timed.

    Its heap (httpx, 64 clients, every latency so far) made a full collection take 90-220 ms
    here, stalling every request in flight; such a pause fell on one side or the other at
    random and moved the throughput ratio by ±0.2 from run to run. Collected before and after.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


def _cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a process and its live children (a gateway's worker processes)."""
    total = 0.0
    for each in (proc, *proc.children(recursive=True)):
        times = each.cpu_times()
        total += times.user + times.system
    return total


def under_load(
    direct: str,
    gateway: str,
    n: int,
    concurrency: int,
    procs: dict[str, psutil.Process],
    blocks: int = 5,
    body: dict[str, Any] = BODY,
) -> Any:
    """(a): alternating blocks of n/blocks requests each way; also the CPU the gateway and the
    engine spent per request (on a small machine they share cores with the load generator)."""
    sides: dict[str, tuple[list[float], float]] = {"direct": ([], 0.0), "gateway": ([], 0.0)}
    cpu = {side: dict.fromkeys(procs, 0.0) for side in sides}
    for _ in range(blocks):
        for name, url in (("direct", direct), ("gateway", gateway)):
            before = {p: _cpu_s(proc) for p, proc in procs.items()}
            latencies, seconds = asyncio.run(_load(url, n // blocks, concurrency, body))
            for p, proc in procs.items():
                cpu[name][p] += _cpu_s(proc) - before[p]
            sides[name] = (sides[name][0] + latencies, sides[name][1] + seconds)
    result: dict[str, Any] = {}
    for name, (latencies, seconds) in sides.items():
        per_request = {p: round(1000 * s / len(latencies), 3) for p, s in cpu[name].items()}
        result[name] = {
            "rps": round(len(latencies) / seconds, 1),
            **_stats(latencies),
            "cpu_ms_per_request": per_request,
        }
    result["throughput_ratio"] = round(result["gateway"]["rps"] / result["direct"]["rps"], 3)
    for q in ("p50", "p99"):
        result[f"added_{q}_ms"] = round(result["gateway"][q] - result["direct"][q], 3)
    return result


def one_at_a_time(
    direct: str, gateway: str, n: int, body: dict[str, Any] = BODY, warm_up: int = 50
) -> Any:
    """(b): requests alternate between the two ways, one at a time."""
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    with httpx.Client(timeout=120) as client, _no_collection():
        for i in range(n + warm_up):
            for name, url in (("direct", direct), ("gateway", gateway)):
                started = time.perf_counter()
                client.post(url, json=body).raise_for_status()
                if i >= warm_up:  # the first ones warm both up
                    times[name].append((time.perf_counter() - started) * 1000)
    result = {name: _stats(ms) for name, ms in times.items()}
    for q in ("p50", "p99"):
        result[f"added_{q}_ms"] = round(result["gateway"][q] - result["direct"][q], 3)
    return result


def client_redis_mode(redis_url: str, namespace: str, direct: str, n: int) -> Any:
    """(c): UnifiedInferenceClient(redis://…) against plain httpx to the engine URL."""
    times: dict[str, list[float]] = {"direct": [], "client": []}
    os.environ["SAGE_MQ_NAMESPACE"] = namespace
    ours = UnifiedInferenceClient.create(control_plane_url=redis_url, default_llm_model="demo")
    with ours, httpx.Client(timeout=30) as plain:
        for i in range(n + 50):
            started = time.perf_counter()
            reply = plain.post(direct, json=BODY)
            reply.raise_for_status()
            reply.json()["choices"][0]["message"]["content"]
            if i >= 50:
                times["direct"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            ours.chat(BODY["messages"])
            if i >= 50:
                times["client"].append((time.perf_counter() - started) * 1000)
    result = {name: _stats(ms) for name, ms in times.items()}
    mean = {name: sum(ms) / len(ms) for name, ms in times.items()}
    result["overhead_pct_p50"] = round(
        100 * (result["client"]["p50"] / result["direct"]["p50"] - 1), 1
    )
    result["overhead_pct_mean"] = round(100 * (mean["client"] / mean["direct"] - 1), 1)
    return result


def main(
    n: int, concurrency: int, engine_latency_ms: float = 0.0, gateway_workers: int = 1
) -> dict[str, Any]:
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(url, Path(tmp))
        try:
            low = fleet.start_scheduler_and_node()
            gw_port = low + 50
            gateway_proc = fleet.start(
                "gateway",
                "gateway",
                "run",
                "--port",
                str(gw_port),
                "--workers",
                str(gateway_workers),
                "--log-level",
                "WARNING",
            )
            extra = (
                ["--extra-args", f"--latency-ms {engine_latency_ms}"] if engine_latency_ms else []
            )
            record = fleet.cli(
                "engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait", *extra
            )
            direct = f"{record['url']}/v1/chat/completions"
            gateway = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            _wait_until_served(gateway)
            procs = {
                "gateway": psutil.Process(gateway_proc.pid),
                "engine": psutil.Process(int(record["pid"])),
            }
            loaded = under_load(direct, gateway, n, concurrency, procs)
            single = one_at_a_time(direct, gateway, min(n, 1000))
            client = client_redis_mode(url, fleet.env["SAGE_MQ_NAMESPACE"], direct, min(n, 1000))
        finally:
            fleet.close()
    return {
        "benchmark": "gateway_overhead",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "requests": n,
        "concurrency": concurrency,
        "engine_latency_ms": engine_latency_ms,
        "gateway_workers": gateway_workers,
        "under_load": loaded,
        "one_at_a_time": single,
        "client_redis_mode": client,
        "targets": {
            "throughput_ratio": 0.8,
            "added_p50_ms": 1.0,
            "added_p99_ms": 5.0,
            "client_overhead_pct": 5.0,
        },
        "anchor": ANCHOR,
    }


def _wait_until_served(url: str, body: dict[str, Any] = BODY) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, json=body, timeout=60).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the gateway never served {url}")


def _print(r: dict[str, Any]) -> None:
    load, single, client = r["under_load"], r["one_at_a_time"], r["client_redis_mode"]
    print(
        f"(a) {r['concurrency']} clients, {r['requests']} chat requests per side, engine "
        f"answering in {r['engine_latency_ms']} ms + its own time"
    )
    print(f"{'':12}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}   CPU ms per request")
    for side in ("direct", "gateway"):
        s = load[side]
        cpu = ", ".join(f"{p} {ms}" for p, ms in s["cpu_ms_per_request"].items())
        print(f"{side:12}{s['rps']:>10}{s['p50']:>10}{s['p99']:>10}   {cpu}")
    print(
        f"throughput ratio {load['throughput_ratio']} (target ≥ 0.8); "
        f"added p50 {load['added_p50_ms']} ms, p99 {load['added_p99_ms']} ms"
    )
    print(
        f"(b) one at a time: direct p50 {single['direct']['p50']} ms, gateway p50 "
        f"{single['gateway']['p50']} ms; added p50 {single['added_p50_ms']} ms (≤ 1), "
        f"p99 {single['added_p99_ms']} ms (≤ 5)"
    )
    print(
        f"(c) client, Redis mode: p50 {client['client']['p50']} ms vs httpx "
        f"{client['direct']['p50']} ms: +{client['overhead_pct_p50']} % p50, "
        f"+{client['overhead_pct_mean']} % mean (≤ 5 %)"
    )
    print(f"for scale: {r['anchor']}")


if __name__ == "__main__":
    parser = parser_for(__doc__, "gateway_overhead")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--engine-latency-ms",
        type=float,
        default=0.0,
        help="the fake engine's time per answer (0: pure overhead, the worst case)",
    )
    parser.add_argument("--gateway-workers", type=int, default=1, help="gateway processes")
    args = parser.parse_args()
    finish(
        main(args.requests, args.concurrency, args.engine_latency_ms, args.gateway_workers),
        args.out,
        _print,
    )
