"""Round trip of a command to an agent-side handler and its event back: raw redis-py vs our bus.

(a) floor: redis-py XADD → XREADGROUP → reply XADD + XACK → client XREAD.
(b) ours:  Bus.publish(TerminateEngine) → Consumer (decode, idempotency check, handler returns
    an EngineStopped event, published with marker + XACK in one MULTI) → client XREAD, decoded.

Both sides run in one process against one private redis-server, one after the other, the same
number of times. Prints p50/p99, the ratios, and commands/s with and without batching; writes JSON.

    python benchmarks/bus_roundtrip.py [--n 3000] [--out benchmarks/results/bus_roundtrip.json]
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cli import finish, parser_for
from benchmarks._redis import percentile, redis_server
from sage_mq.bus import Bus, Outgoing
from sage_mq.connection import connect
from sage_mq.keys import Keys
from sage_mq.messages import EngineStopped, TerminateEngine
from sage_mq.settings import BusSettings, Settings
from sage_mq.wire import Envelope, decode


class Side:
    """One side of the comparison: a running agent-side consumer and a client round trip."""

    name: str

    async def one(self) -> None:
        """One command out and its reply back."""
        raise NotImplementedError

    async def rate(self, n: int, batch: int) -> float:
        """Commands/s for n commands sent in pipelines of ``batch``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the agent side and disconnect."""
        raise NotImplementedError


class Floor(Side):
    """Raw redis-py: XADD → XREADGROUP → reply XADD + XACK → XREAD."""

    name = "floor (raw redis-py)"

    def __init__(self, url: str, batch: int) -> None:
        self.cmd, self.evt = f"floor{batch}:cmd", f"floor{batch}:evt"
        self.agent = aioredis.Redis.from_url(url, protocol=2, decode_responses=True)
        self.client = aioredis.Redis.from_url(url, protocol=2, decode_responses=True)
        self.batch = batch
        self.stop = asyncio.Event()
        self.cursor = "0-0"
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Floor:
        await self.agent.xgroup_create(self.cmd, "g", id="0", mkstream=True)
        self.task = asyncio.create_task(self._agent_loop())
        return self

    async def _agent_loop(self) -> None:
        while not self.stop.is_set():
            reply = await self.agent.xreadgroup(
                "g", "a", {self.cmd: ">"}, count=self.batch, block=100
            )
            for _stream, rows in reply or ():
                for entry_id, fields in rows:
                    await self.agent.xadd(self.evt, {"type": "reply", "data": fields["data"]})
                    await self.agent.xack(self.cmd, "g", entry_id)

    async def one(self) -> None:
        await self.client.xadd(self.cmd, {"type": "cmd", "data": "{}"})
        while True:
            reply = await self.client.xread({self.evt: self.cursor}, count=1, block=1000)
            if reply:
                self.cursor = reply[0][1][-1][0]
                return

    async def rate(self, n: int, batch: int) -> float:
        async def send(count: int) -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for _ in range(count):
                    pipe.xadd(self.cmd, {"type": "cmd", "data": "{}"})
                await pipe.execute()

        return await _throughput(self.client, self.evt, n, batch, send)

    async def close(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task
        await self.agent.aclose()
        await self.client.aclose()


class Ours(Side):
    """Our bus and message models, with an agent-side consumer answering terminate commands."""

    name = "ours (Bus + models)"

    def __init__(
        self, url: str, batch: int, *, replica_acks: int | None = None, label: str = "ours"
    ) -> None:
        settings = Settings(
            redis_url=url,
            namespace=f"{label}{batch}",
            bus=BusSettings(batch_size=batch, block_ms=100),
            replica_acks=replica_acks,
        )
        self.agent_redis, self.client_redis = connect(settings), connect(settings)
        keys = Keys(settings.namespace)
        self.agent_bus = Bus(self.agent_redis, keys, settings.bus)
        self.client_bus = Bus(self.client_redis, keys, settings.bus)
        self.commands, self.events = keys.node_commands("n1"), keys.events
        self.cursor = "0-0"

        async def handler(env: Envelope) -> Outgoing:
            return [(self.events, EngineStopped(engine_id="e", node="n1"))]  # out with the ack

        self.consumer = self.agent_bus.consumer([self.commands], "agent", "n1", handler)
        self.task = asyncio.create_task(self.consumer.run())

    async def one(self) -> None:
        await self.client_bus.publish(self.commands, TerminateEngine(engine_id="e"))
        while True:
            reply = await self.client_redis.xread({self.events: self.cursor}, count=1, block=1000)
            if reply:
                self.cursor, fields = reply[0][1][-1]
                assert decode(fields).type == "engine.stopped"
                return

    async def rate(self, n: int, batch: int) -> float:
        async def send(count: int) -> None:
            commands = [TerminateEngine(engine_id="e") for _ in range(count)]
            if count == 1:
                await self.client_bus.publish(self.commands, commands[0])
            else:
                await self.client_bus.publish_many(self.commands, commands)

        return await _throughput(self.client_redis, self.events, n, batch, send)

    async def close(self) -> None:
        self.consumer.stop()
        await self.task
        await self.agent_redis.aclose()
        await self.client_redis.aclose()


async def interleaved_latencies(sides: list[Side], n: int, block: int = 100) -> list[list[float]]:
    """n round trips per side, in alternating blocks, so machine noise falls on both alike."""
    for side in sides:
        for _ in range(min(200, n)):
            await side.one()  # warm-up: connections, caches
    latencies: list[list[float]] = [[] for _ in sides]
    for _ in range(0, n, block):
        for side, out in zip(sides, latencies, strict=True):
            for _ in range(block):
                start = time.perf_counter()
                await side.one()
                out.append((time.perf_counter() - start) * 1000)
    return latencies


async def _throughput(
    client: Any, replies: str, n: int, batch: int, send: Callable[[int], Awaitable[None]]
) -> float:
    """Commands/s: send n (``batch`` per round trip), until n replies have arrived."""
    cursor = await _newest(client, replies)
    start = time.perf_counter()
    waiter = asyncio.create_task(_await_replies(client, replies, cursor, n))
    for i in range(0, n, batch):
        await send(min(batch, n - i))
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
        sides: list[Side] = [await Floor(url, batch=1).start(), Ours(url, batch=1)]
        floor_lat, ours_lat = await interleaved_latencies(sides, n)
        rates_1 = [await side.rate(500, 1) for side in sides]
        for side in sides:
            await side.close()
        sides = [await Floor(url, batch=64).start(), Ours(url, batch=64)]
        rates_64 = [await side.rate(2000, 64) for side in sides]
        for side in sides:
            await side.close()
    floor, ours = summary(floor_lat), summary(ours_lat)
    result = {
        "benchmark": "bus_roundtrip",
        "n": n,
        "machine": platform.node(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "floor": {
            **floor,
            "commands_per_s_unbatched": round(rates_1[0]),
            "commands_per_s_batched_64": round(rates_64[0]),
        },
        "ours": {
            **ours,
            "commands_per_s_unbatched": round(rates_1[1]),
            "commands_per_s_batched_64": round(rates_64[1]),
        },
        "ratio_p50": round(ours["p50_ms"] / floor["p50_ms"], 2),
        "ratio_p99": round(ours["p99_ms"] / floor["p99_ms"], 2),
        "ratio_throughput_batched": round(rates_64[1] / rates_64[0], 2),
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
    parser = parser_for(__doc__, "bus_roundtrip")
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    finish(asyncio.run(main(args.n)), args.out, _print)
