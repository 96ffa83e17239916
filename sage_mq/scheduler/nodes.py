"""Node loss and return: a node whose liveness key expired is lost; its engines move elsewhere."""

from __future__ import annotations

import logging
import time
import uuid

from sage_mq.messages import EvacuateNode, NodeJoined, NodeLost, ReportEngines, SettleNode
from sage_mq.scheduler.context import Context
from sage_mq.scheduler.placing import Placing
from sage_mq.scheduler.tracking import Tracking
from sage_mq.store import EngineRecord, EngineState, NodeRecord, oldest_first
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
S = EngineState
SETTLE_S = 15.0
"""How long a node that came back has to report the engines moved away from it (its agent
reports them at once: this is for an agent that lost its state)."""
WAITING_SCAN_S = 1.0
"""How long the list of engines waiting for capacity is reused (a scan reads every record)."""


class NodeWatch:
    """Notices nodes going and coming back; moves the engines of the lost ones."""

    def __init__(self, ctx: Context, placing: Placing, tracking: Tracking) -> None:
        self.ctx = ctx
        self.placing = placing
        self.tracking = tracking
        self._scanned: tuple[float, list[str]] | None = None
        """When the engines waiting for capacity were last found, and their ids."""

    async def check(self, listed: list[tuple[NodeRecord, bool]]) -> None:
        """Compare liveness with what the records say (the leader does this each tick)."""
        for record, alive in listed:
            if not alive and record.status != "lost":
                await self._lost(record)
            elif alive and record.status == "lost":
                await self._back(record)

    async def _lost(self, node: NodeRecord) -> None:
        await self.ctx.fleet.set_status(node.node_id, "lost")
        await self.ctx.emit(NodeLost(node_id=node.node_id))
        grace = self.ctx.scheduler.node_lost_grace_s
        log.error(
            "node %s lost (liveness key expired); its engines move in %.1fs", node.node_id, grace
        )
        await self.ctx.timers.schedule(
            f"evacuate-{node.node_id}-{uuid.uuid4().hex[:8]}",
            time.time() + grace,
            EvacuateNode(node_id=node.node_id),
        )

    async def _back(self, node: NodeRecord) -> None:
        await self.ctx.fleet.set_status(node.node_id, "up")
        log.info("node %s is back; asking it what it runs", node.node_id)
        await self.ctx.command(node.node_id, ReportEngines())  # kept, taken back, or stopped
        await self.ctx.emit(
            NodeJoined(
                node_id=node.node_id,
                address=node.address,
                gpu_count=len(node.gpus),
                epoch=node.epoch,
            )
        )

    async def on_evacuate(self, req: EvacuateNode, env: Envelope) -> None:
        """The grace is over: move every engine of the node, unless it came back meanwhile."""
        node = await self.ctx.store.get_node(req.node_id)
        if node is None or node.status != "lost" or await self.ctx.store.is_alive(req.node_id):
            return
        where = await self.ctx.store.engine_placements()
        held = [e for e, (state, node) in where.items() if node == req.node_id]
        for record in oldest_first((await self.ctx.store.get_engines(held)).values()):
            if record.node != req.node_id or record.state.terminal:
                continue
            if record.state == S.STOPPING:  # it cannot confirm; the terminate waits there
                await self.tracking.finish(record, S.STOPPED, None)
                continue
            await self.placing.move(record, f"node {req.node_id} lost")

    async def on_joined(self, joined: NodeJoined, env: Envelope) -> None:
        """Capacity may have come: place the engines waiting PENDING, but those moved away
        from this very node: its agent reports them if they still run there (and they are
        taken back), or, after ``SETTLE_S``, they are placed too."""
        await self.ctx.fleet.refresh_node(joined.node_id)
        expected = False
        for record in await self._waiting():
            if record.lost_node == joined.node_id:
                expected = True
            else:
                await self.placing.place_pending(record)
        if expected:
            await self.ctx.timers.schedule(
                f"settle-{joined.node_id}-{uuid.uuid4().hex[:8]}",
                time.time() + SETTLE_S,
                SettleNode(node_id=joined.node_id),
            )

    async def on_settle(self, req: SettleNode, env: Envelope) -> None:
        """The node has been back ``SETTLE_S``: what it did not report is placed anew."""
        for record in await self._waiting():
            if record.lost_node == req.node_id:
                await self.placing.place_pending(record)

    async def _waiting(self) -> list[EngineRecord]:
        """The engines waiting for capacity (PENDING, unplaced), oldest first, their records
        read now. Finding them reads every engine's state, so the ids found are used again for
        :data:`WAITING_SCAN_S` unless this scheduler has left another engine waiting since: a
        storm of joins (every agent registering again after Redis came back empty) pays for
        one scan, not one per node."""
        now = time.monotonic()
        scanned = self._scanned
        if (
            scanned is None
            or now - scanned[0] > WAITING_SCAN_S
            or not self.placing.left_waiting <= set(scanned[1])
        ):
            where = await self.ctx.store.engine_placements()
            ids = [e for e, (state, node) in where.items() if state == S.PENDING and node is None]
            self.placing.left_waiting &= set(ids)
            scanned = self._scanned = (now, ids)
        found = (await self.ctx.store.get_engines(scanned[1])).values()
        return [r for r in oldest_first(found) if r.state == S.PENDING and r.node is None]
