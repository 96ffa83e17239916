"""How a node is known to be alive: its record, its agent epoch, its liveness key, node.joined."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from sage_mq.agent.outbox import Outbox
from sage_mq.agent.preflight import refuse_a_second_agent
from sage_mq.agent.runtimes import Runtime
from sage_mq.connection import raise_if_cancelled
from sage_mq.engines.argv_policy import NodeAllowances
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.gpu import GPUResourceManager
from sage_mq.messages import NodeJoined
from sage_mq.settings import AgentSettings
from sage_mq.store import NodeRecord, Store

log = logging.getLogger(__name__)
_REWRITE_EVERY = 30
"""Heartbeats between full rewrites of the node record (GPU memory figures go stale)."""


class Presence:
    """Registers the node and keeps its liveness key fresh."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        agent: AgentSettings,
        gpus: GPUResourceManager,
        allowances: NodeAllowances | None = None,
        runtimes: Mapping[str, Runtime] | None = None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.agent = agent
        self.gpus = gpus
        self.allowances = allowances or NodeAllowances()
        self.runtimes = {b: r.version for b, r in (runtimes or {}).items()}
        self.node_id = agent.node_id
        self.epoch = 0
        self.beats = 0

    async def register(self, stopping: asyncio.Event) -> None:
        """Announce the node, waiting for Redis if it is away; refuses a second live agent."""
        delay = 0.2
        while not stopping.is_set():
            try:
                await refuse_a_second_agent(self.store, self.node_id)
                await self.announce()
                return
            except ControlPlaneUnavailable as exc:
                log.warning("cannot register node %s yet: %s", self.node_id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def announce(self) -> None:
        """Take a new epoch, write the node record and liveness key, publish node.joined."""
        self.epoch = await self.store.next_epoch(self.node_id)
        await self.write_record()
        address = self.agent.advertise_address
        joined = NodeJoined(
            node_id=self.node_id, address=address, gpu_count=len(self.gpus.gpus()), epoch=self.epoch
        )
        await self.outbox.send(joined)
        log.info("node %s joined (epoch %d, %s)", self.node_id, self.epoch, address)

    async def write_record(self) -> None:
        """The whole node record, and a fresh liveness key."""
        low, high = self.agent.port_range
        record = NodeRecord(
            node_id=self.node_id,
            address=self.agent.advertise_address,
            gpus=self.gpus.gpus(),
            epoch=self.epoch,
            port_range_start=low,
            port_range_end=high,
            hostname=socket.gethostname(),
            agent_pid=os.getpid(),
            allowed_commands=sorted(self.allowances.commands),
            allowed_engine_flags=sorted(self.allowances.engine_flags),
            runtimes=self.runtimes,
        )
        await self.store.put_node(record, self.agent.liveness_ttl_s)

    async def keep_alive(
        self, back_in_touch: Callable[[str], None], each_beat: Callable[[], None]
    ) -> None:
        """Beat every TTL/3 until cancelled, whatever fails (a heartbeat that ended would get
        a healthy node declared lost); ``back_in_touch(why)`` once Redis answers again after
        it was away or lost this node's records; ``each_beat()`` after every attempt."""
        cut_off_since: float | None = None
        while True:
            raise_if_cancelled()  # see connection.raise_if_cancelled
            await asyncio.sleep(self.agent.liveness_ttl_s / 3)
            try:
                rejoined = await self.beat()
            except ControlPlaneUnavailable as exc:
                cut_off_since = cut_off_since or time.monotonic()
                log.warning(
                    "node %s heartbeat failed (engines keep running): %s", self.node_id, exc
                )
            except Exception:
                log.exception("node %s heartbeat failed unexpectedly; beating on", self.node_id)
            else:
                if rejoined:
                    back_in_touch("Redis had lost this node's records")
                elif cut_off_since is not None:
                    back_in_touch(f"after {time.monotonic() - cut_off_since:.1f} s cut off")
                cut_off_since = None
            each_beat()

    async def beat(self) -> bool:
        """One heartbeat; re-registers if Redis lost the node (e.g. restarted empty), and
        says so (True)."""
        self.beats += 1
        rejoined = await self.store.get_node(self.node_id) is None
        if rejoined:
            log.warning("node %s vanished from Redis; registering again", self.node_id)
            await self.announce()
        elif self.beats % _REWRITE_EVERY == 0:
            await self.write_record()
        else:
            await self.store.touch_node(self.node_id, self.epoch, self.agent.liveness_ttl_s)
        await self.outbox.flush()
        return rejoined
