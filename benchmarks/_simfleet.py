"""Simulated node agents for the scale benchmark: many nodes in one asyncio process.

Each simulated node registers like a real agent (node record, liveness key, ``node.joined``),
heartbeats, and answers its command stream as an agent whose engines always start and stay
healthy: a launch gets ``engine.starting`` then ``engine.ready``, a terminate
``engine.stopped``, a health tick one ``node.health`` with every engine it holds. Nothing is
spawned; the scheduler on the other side is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq.bus import Bus
from sage_mq.connection import raise_if_cancelled
from sage_mq.gpu import FakeGpus
from sage_mq.hashes import to_hash
from sage_mq.keys import Keys
from sage_mq.messages import (
    SCHEMA_VERSION,
    EngineReady,
    EngineStarting,
    EngineStopped,
    HealthTick,
    LaunchEngine,
    Message,
    NodeHealth,
    NodeJoined,
    TerminateEngine,
)
from sage_mq.settings import BusSettings
from sage_mq.store import NodeRecord, Store
from sage_mq.wire import decode, encode, envelope

_READ_BATCH = 512
_MAXLEN = BusSettings().stream_maxlen
_POLL_S = 0.005


@dataclass
class SimulatedNode:
    node_id: str
    engines: dict[str, int] = field(default_factory=dict)
    """Engine id -> generation of what this node runs."""
    report: str | None = None
    """The JSON of its health report, until its engines change."""


class SimulatedFleet:
    """``nodes`` simulated agents with ``gpus`` fake GPUs each: their commands on one Redis
    client, their heartbeats on another (``beat_redis``; as a real agent's beat never waits
    behind its commands)."""

    def __init__(
        self,
        redis: Any,
        namespace: str,
        nodes: int,
        gpus: str,
        *,
        liveness_ttl_s: float = 5.0,
        beat_redis: Any = None,
    ) -> None:
        self.redis = redis
        self.beat_redis = beat_redis or redis
        self.keys = Keys(namespace)
        self.bus = Bus(redis, self.keys)
        self.store = Store(redis, self.keys)
        self.nodes = {f"sim-{i:04d}": SimulatedNode(f"sim-{i:04d}") for i in range(nodes)}
        self.gpus = FakeGpus(gpus).snapshot()
        self.ttl_s = liveness_ttl_s
        self.launched_at: dict[str, float] = {}
        """Engine id -> when its launch command reached its node (wall clock)."""
        self.launch_sent_at: dict[str, float] = {}
        """Engine id -> when the scheduler published its launch command (the envelope's ts)."""
        self.health_reports = 0
        self.ticks_read_at: list[float] = []
        """When a read brought health ticks (wall clock): when the scheduler's ticks landed."""
        self._cursors = {self.keys.node_commands(n): "$" for n in self.nodes}
        self._node_of = {self.keys.node_commands(n): node for n, node in self.nodes.items()}

    async def register(self) -> None:
        """Node records, liveness keys and ``node.joined`` for every node, in a few round trips."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, node_id in enumerate(self.nodes):
                record = NodeRecord(
                    node_id=node_id,
                    address=f"10.{i // 250}.{i % 250}.1",
                    gpus=self.gpus,
                    epoch=1,
                    port_range_start=40000,
                    port_range_end=40999,
                    hostname=node_id,
                )
                pipe.hset(self.keys.node(node_id), mapping=to_hash(record))
                pipe.sadd(self.keys.nodes, node_id)
                pipe.set(self.keys.node_alive(node_id), "1", px=int(self.ttl_s * 1000))
            await pipe.execute()
        for stream in self._cursors:  # read from now on: nothing was sent before we joined
            self._cursors[stream] = await self.bus.last_id(stream)
        joined: list[Message] = [
            NodeJoined(node_id=n, address="10.0.0.1", gpu_count=len(self.gpus), epoch=1)
            for n in self.nodes
        ]
        await self.bus.publish_many(self.keys.events, joined)

    async def heartbeats(self, interval_s: float = 1.0, slices: int = 20) -> None:
        """Refresh every liveness key and ``last_seen``, as each agent does once a second.

        Agents on separate hosts beat at unrelated moments: the nodes beat in ``slices``
        groups spread over the interval, not all at once.
        """
        ids = list(self.nodes)
        while True:
            for part in range(slices):
                started = time.monotonic()
                try:
                    async with self.beat_redis.pipeline(transaction=False) as pipe:
                        now = str(time.time())
                        for node_id in ids[part::slices]:
                            pipe.set(self.keys.node_alive(node_id), "1", px=int(self.ttl_s * 1000))
                            pipe.hset(self.keys.node(node_id), "last_seen", now)
                        await pipe.execute()
                except (RedisTimeoutError, RedisConnectionError) as exc:  # beat on, as agents do
                    print(f"simulated heartbeats: {exc!r}; beating on", file=sys.stderr)
                raise_if_cancelled()  # redis-py can drop a cancellation: see its docstring
                await asyncio.sleep(max(0.0, interval_s / slices - (time.monotonic() - started)))

    async def answer_commands(self) -> None:
        """Read every node's command stream and answer as a healthy agent would."""
        while True:
            reply = await self.redis.xread(self._cursors, count=_READ_BATCH, block=100)
            received = time.time()
            out: list[dict[str, str]] = []
            reports = self.health_reports
            for stream, rows in reply or ():
                node = self._node_of[stream]
                for entry_id, fields in rows:
                    self._cursors[stream] = entry_id
                    if fields.get("type") == HealthTick.TYPE:  # most of the traffic: no decoding
                        out.append(self._health_report(node))
                        continue
                    env = decode(fields)
                    if isinstance(env.payload, LaunchEngine):
                        self.launch_sent_at.setdefault(env.payload.engine_id, env.ts)
                    out.extend(
                        encode(envelope(m)) for m in self._answer(node, env.payload, received)
                    )
            if self.health_reports != reports:
                self.ticks_read_at.append(received)
            if out:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for fields in out:
                        pipe.xadd(self.keys.events, fields, maxlen=_MAXLEN, approximate=True)
                    await pipe.execute()
            if reply:  # an agent deletes what it has carried out (Consumer trim=True)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for stream, _rows in reply:
                        ms, seq = self._cursors[stream].split("-")
                        pipe.xtrim(stream, minid=f"{ms}-{int(seq) + 1}", approximate=False)
                    await pipe.execute()
            raise_if_cancelled()  # redis-py can drop a cancellation: see its docstring
            await asyncio.sleep(_POLL_S)  # one XREAD names 1,000 streams: not after every entry

    def _health_report(self, node: SimulatedNode) -> dict[str, str]:
        """A ``node.health`` entry, every engine healthy; its JSON is kept until they change.

        (A real agent pays for encoding on its own host; here 1,000 agents share this one.)
        """
        self.health_reports += 1
        if node.report is None:
            results = dict.fromkeys(node.engines, True)
            node.report = NodeHealth(node_id=node.node_id, results=results).model_dump_json()
        return {
            "type": NodeHealth.TYPE,
            "data": node.report,
            "id": uuid.uuid4().hex,
            "ts": f"{time.time():.6f}",
            "v": str(SCHEMA_VERSION),
        }

    def _answer(self, node: SimulatedNode, cmd: Message, received: float) -> list[Message]:
        if isinstance(cmd, LaunchEngine):
            self.launched_at.setdefault(cmd.engine_id, received)
            node.engines[cmd.engine_id] = cmd.generation
            node.report = None
            url = f"http://{cmd.host}:{cmd.port}"
            argv = ("vllm", "serve", cmd.model, "--port", str(cmd.port))
            gen = cmd.generation
            return [
                EngineStarting(engine_id=cmd.engine_id, node=node.node_id, generation=gen,
                               pid=100000 + len(self.launched_at), argv=argv),
                EngineReady(engine_id=cmd.engine_id, node=node.node_id, generation=gen, url=url),
            ]  # fmt: skip
        if isinstance(cmd, TerminateEngine):
            with contextlib.suppress(KeyError):
                del node.engines[cmd.engine_id]
            node.report = None
            return [EngineStopped(engine_id=cmd.engine_id, node=node.node_id)]
        return []
