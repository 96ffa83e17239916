"""Round trip of a command to an agent-side handler and its event back: raw redis-py vs our bus.

(a) floor: redis-py XADD → XREADGROUP → reply XADD + XACK → client XREAD.
(b) ours:  Bus.publish(HealthTick) → Consumer (decode, idempotency check, handler returns a
    NodeHealth event, published with marker + XACK in one MULTI) → client XREAD, decoded.

Both sides run in one process against one private redis-server, one after the other, the same
number of times. Prints p50/p99, the ratios, and commands/s with and without batching; writes JSON.

    python benchmarks/bus_roundtrip.py [--n 3000] [--out benchmarks/results/bus_roundtrip.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._redis import percentile, redis_server
from sage_mq.bus import Bus, Outgoing
from sage_mq.connection import connect
from sage_mq.keys import Keys
from sage_mq.messages import Envelope, HealthTick, NodeHealth, decode
from sage_mq.settings import BusSettings, Settings

RoundTrip = Callable[[], Awaitable[None]]


async def floor_side(url: str, n: int, batch: int) -> tuple[list[float], float]:
    """Raw redis-py: latencies of n sequential round trips, then throughput with batching."""
    agent = aioredis.Redis.from_url(url, protocol=2, decode_responses=True)
    client = aioredis.Redis.from_url(url, protocol=2, decode_responses=True)
    await agent.xgroup_create("floor:cmd", "g", id="0", mkstream=True)
    stop = asyncio.Event()

    async def agent_loop() -> None:
        while not stop.is_set():
            reply = await agent.xreadgroup("g", "a", {"floor:cmd": ">"}, count=batch, block=100)
            for _stream, rows in reply or ():
                for entry_id, fields in rows:
                    await agent.xadd("floor:evt", {"type": "reply", "data": fields["data"]})
                    await agent.xack("floor:cmd", "g", entry_id)

    task = asyncio.create_task(agent_loop())
    cursor = "0-0"

    async def one() -> None:
        nonlocal cursor
        await client.xadd("floor:cmd", {"type": "cmd", "data": "{}"})
        while True:
            reply = await client.xread({"floor:evt": cursor}, count=1, block=1000)
            if reply:
                cursor = reply[0][1][-1][0]
                return

    latencies = await _measure(one, n)
    rate = await _throughput(
        client, "floor:cmd", "floor:evt", n, batch, lambda: {"type": "cmd", "data": "{}"}
    )
    stop.set()
    await task
    await agent.aclose()
    await client.aclose()
    return latencies, rate


async def ours_side(url: str, n: int, batch: int) -> tuple[list[float], float]:
    """Our bus and message models, agent-side consumer and handler."""
    settings = Settings(
        redis_url=url, namespace="ours", bus=BusSettings(batch_size=batch, block_ms=100)
    )
    agent_redis, client_redis = connect(settings), connect(settings)
    keys = Keys("ours")
    agent_bus, client_bus = (
        Bus(agent_redis, keys, settings.bus),
        Bus(client_redis, keys, settings.bus),
    )
    commands, events = keys.node_commands("n1"), keys.events

    async def handler(env: Envelope) -> Outgoing:
        return [(events, NodeHealth(node_id="n1", results={}))]  # as the agent answers a tick

    consumer = agent_bus.consumer([commands], "agent", "n1", handler)
    task = asyncio.create_task(consumer.run())
    cursor = "0-0"

    async def one() -> None:
        nonlocal cursor
        await client_bus.publish(commands, HealthTick())
        while True:
            reply = await client_redis.xread({events: cursor}, count=1, block=1000)
            if reply:
                cursor, fields = reply[0][1][-1]
                assert decode(fields).type == "node.health"
                return

    latencies = await _measure(one, n)
    rate = await _throughput_ours(client_bus, client_redis, commands, events, n, batch)
    consumer.stop()
    await task
    await agent_redis.aclose()
    await client_redis.aclose()
    return latencies, rate


async def _measure(one: RoundTrip, n: int) -> list[float]:
    for _ in range(min(200, n)):
        await one()  # warm-up: connections, caches
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        await one()
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


async def _throughput(
    client: Any, stream: str, replies: str, n: int, batch: int, fields: Callable[[], dict[str, str]]
) -> float:
    """Commands/s: send n (in pipelines of ``batch``), wait until n replies arrived."""
    cursor = await _newest(client, replies)
    start = time.perf_counter()
    waiter = asyncio.create_task(_await_replies(client, replies, cursor, n))
    for i in range(0, n, batch):
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(min(batch, n - i)):
                pipe.xadd(stream, fields())
            await pipe.execute()
    await waiter
    return n / (time.perf_counter() - start)


async def _throughput_ours(
    bus: Bus, client: Any, commands: str, events: str, n: int, batch: int
) -> float:
    cursor = await _newest(client, events)
    start = time.perf_counter()
    waiter = asyncio.create_task(_await_replies(client, events, cursor, n))
    for i in range(0, n, batch):
        chunk = [HealthTick() for _ in range(min(batch, n - i))]
        if batch == 1:
            await bus.publish(commands, chunk[0])
        else:
            await bus.publish_many(commands, chunk)
    await waiter
    return n / (time.perf_counter() - start)


async def _newest(client: Any, stream: str) -> str:
    rows = await client.xrevrange(stream, count=1)
    return str(rows[0][0]) if rows else "0-0"


async def _await_replies(client: Any, stream: str, cursor: str, n: int) -> None:
    """Block on the reply stream until n more entries have arrived (a second connection)."""
    reader = aioredis.Redis(connection_pool=client.connection_pool)
    seen = 0
    while seen < n:
        reply = await reader.xread({stream: cursor}, count=1000, block=1000)
        for _name, rows in reply or ():
            seen += len(rows)
            cursor = rows[-1][0]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 50), 4),
        "p99_ms": round(percentile(latencies, 99), 4),
        "mean_ms": round(sum(latencies) / len(latencies), 4),
    }


async def main(n: int) -> dict[str, Any]:
    with redis_server() as url:
        floor_lat, floor_rate_1 = await floor_side(url, n, batch=1)
        ours_lat, ours_rate_1 = await ours_side(url, n, batch=1)
    with redis_server() as url:  # fresh server: same stream sizes for the batched runs
        _f, floor_rate_b = await floor_side(url, 200, batch=64)
        _o, ours_rate_b = await ours_side(url, 200, batch=64)
    floor, ours = summary(floor_lat), summary(ours_lat)
    result = {
        "benchmark": "bus_roundtrip",
        "n": n,
        "machine": platform.node(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "floor": {
            **floor,
            "commands_per_s_unbatched": round(floor_rate_1),
            "commands_per_s_batched_64": round(floor_rate_b),
        },
        "ours": {
            **ours,
            "commands_per_s_unbatched": round(ours_rate_1),
            "commands_per_s_batched_64": round(ours_rate_b),
        },
        "ratio_p50": round(ours["p50_ms"] / floor["p50_ms"], 2),
        "ratio_p99": round(ours["p99_ms"] / floor["p99_ms"], 2),
        "targets": {"ratio_p50_max": 2.0, "ratio_p99_max": 3.0},
    }
    return result


def _print(r: dict[str, Any]) -> None:
    f, o = r["floor"], r["ours"]
    print(f"bus round trip, n={r['n']} (one private redis-server, loopback)")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'cmd/s 1x1':>12}{'cmd/s x64':>12}")
    for name, s in (("floor (raw redis-py)", f), ("ours (Bus + models)", o)):
        print(
            f"{name:24}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}"
            f"{s['commands_per_s_unbatched']:>12}{s['commands_per_s_batched_64']:>12}"
        )
    print(
        f"ratio ours/floor: p50 {r['ratio_p50']}x (target ≤ 2), p99 {r['ratio_p99']}x (target ≤ 3)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bus_roundtrip.json"))
    args = parser.parse_args()
    figures = asyncio.run(main(args.n))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    _print(figures)
    print(f"wrote {args.out}")
