"""The gateway's hop to an engine, by three HTTP clients: ours (``sage_mq.upstream``), aiohttp
and httpx, on the same engine in the same run.

The gateway and the batch workers POST a JSON body to an engine and hand the answer back; this
measures only that hop, in one process on the event loop the gateway uses (uvloop when it is
installed, as uvicorn picks it), against one fake engine process (``backend=fake``, no model).
Each client sends N chat requests with C in flight, in alternating blocks so that drift hits
every side alike; the figures are this process's CPU time per request (the hop's cost, which
bounds the gateway's throughput) and the wall-clock throughput. The engine's CPU is not
counted: it is another process.

    python benchmarks/upstream_client.py [--requests 6000] [--concurrency 16]
        [--out benchmarks/results/upstream_client.json]

aiohttp is in the ``bench`` extra (and ``dev``); without it its side is skipped with a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cli import finish, parser_for
from benchmarks._fleet import BENCH_MARK
from benchmarks._redis import free_port
from sage_mq.upstream import Upstream

BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}).encode()
Post = Callable[[str], Awaitable[int]]


@contextlib.contextmanager
def fake_engine(workdir: Path) -> Iterator[str]:
    """One fake engine process on a free loopback port; its base URL."""
    port = free_port()
    env = {**os.environ, BENCH_MARK: str(workdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_mq.engines.fake_server", "--model", "demo",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("the fake engine did not come up in 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def _ours() -> tuple[Post, Callable[[], Awaitable[None]]]:
    client = Upstream()

    async def post(url: str) -> int:
        answer = await client.post(url, BODY)
        await answer.read()
        return answer.status

    return post, client.aclose


async def _httpx() -> tuple[Post, Callable[[], Awaitable[None]]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    client = httpx.AsyncClient(limits=limits, timeout=60)
    headers = {"content-type": "application/json"}

    async def post(url: str) -> int:
        answer = await client.post(url, content=BODY, headers=headers)
        return answer.status_code

    return post, client.aclose


async def _aiohttp() -> tuple[Post, Callable[[], Awaitable[None]]] | None:
    try:
        import aiohttp
    except ImportError:
        return None
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    headers = {"content-type": "application/json"}

    async def post(url: str) -> int:
        async with session.post(url, data=BODY, headers=headers) as answer:
            await answer.read()
            return answer.status

    return post, session.close


async def _block(post: Post, url: str, n: int, concurrency: int) -> tuple[float, float]:
    """CPU seconds and wall seconds for ``n`` requests, ``concurrency`` in flight."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await post(url)
            if status != 200:
                raise RuntimeError(f"HTTP {status} from the engine")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def measure(url: str, n: int, concurrency: int, blocks: int) -> dict[str, Any]:
    sides: dict[str, tuple[Post, Callable[[], Awaitable[None]]]] = {
        "ours": await _ours(),
        "httpx": await _httpx(),
    }
    aio = await _aiohttp()
    if aio is not None:
        sides["aiohttp"] = aio
    else:
        print("aiohttp is not installed (pip install -e '.[bench]'): its side is skipped")
    target = f"{url}/v1/chat/completions"
    totals = {name: [0.0, 0.0] for name in sides}
    per_block = max(1, n // blocks)
    try:
        for post, _close in sides.values():
            await _block(post, target, min(200, per_block), concurrency)  # warm: connections
        gc.collect()
        gc.disable()
        for _ in range(blocks):
            for name, (post, _close) in sides.items():
                cpu, wall = await _block(post, target, per_block, concurrency)
                totals[name][0] += cpu
                totals[name][1] += wall
    finally:
        gc.enable()
        for _post, close in sides.values():
            await close()
    count = per_block * blocks
    return {
        name: {
            "cpu_ms_per_request": round(cpu / count * 1000, 4),
            "requests_per_s": round(count / wall, 1),
        }
        for name, (cpu, wall) in totals.items()
    } | {"requests_per_side": count}


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    if _loop_name() == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def main(requests: int, concurrency: int, blocks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, fake_engine(Path(tmp)) as url:
        sides = _run(measure(url, requests, concurrency, blocks))
    ours = sides["ours"]["cpu_ms_per_request"]
    ratios = {
        f"cpu_ratio_vs_{peer}": round(ours / sides[peer]["cpu_ms_per_request"], 3)
        for peer in ("httpx", "aiohttp")
        if peer in sides
    }
    return {
        "benchmark": "upstream_client",
        "loop": _loop_name(),
        "concurrency": concurrency,
        "sides": sides,
        **ratios,
        "machine": f"{platform.node()} ({os.cpu_count()} cores), "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def _print(r: dict[str, Any]) -> None:
    print(f"the gateway's hop, {r['sides']['requests_per_side']} requests per client, "
          f"{r['concurrency']} in flight, {r['loop']}:")  # fmt: skip
    for name, side in r["sides"].items():
        if isinstance(side, dict):
            print(f"  {name:8} {side['cpu_ms_per_request']:.4f} ms CPU per request, "
                  f"{side['requests_per_s']:,.0f} req/s")  # fmt: skip
    for key in ("cpu_ratio_vs_aiohttp", "cpu_ratio_vs_httpx"):
        if key in r:
            print(f"  ours / {key.rsplit('_', 1)[1]}: {r[key]:.2f}x the CPU per request")


if __name__ == "__main__":
    parser = parser_for(__doc__, "upstream_client")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    finish(main(args.requests, args.concurrency, args.blocks), args.out, _print)
