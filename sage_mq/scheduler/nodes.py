"""Node loss and return: a node whose liveness key expired is lost; its engines move elsewhere."""

from __future__ import annotations

import logging
import time
import uuid

from sage_mq.messages import EvacuateNode, NodeJoined, NodeLost
from sage_mq.scheduler.context import Context
from sage_mq.scheduler.placing import Placing
from sage_mq.scheduler.tracking import Tracking
from sage_mq.store import EngineState, NodeRecord, oldest_first
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
S = EngineState


class NodeWatch:
    """Notices nodes going and coming back; moves the engines of the lost ones."""

    def __init__(self, ctx: Context, placing: Placing, tracking: Tracking) -> None:
        self.ctx = ctx
        self.placing = placing
        self.tracking = tracking

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
        log.info("node %s is back", node.node_id)
        await self.ctx.emit(
            NodeJoined(
                node_id=node.node_id,
                address=node.address,
                gpu_count=len(node.gpus),
                epoch=node.epoch,
            )
        )

    async def on_evacuate(self, env: Envelope) -> None:
        """The grace is over: move every engine of the node, unless it came back meanwhile."""
        req = env.payload
        assert isinstance(req, EvacuateNode)
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

    async def on_joined(self, env: Envelope) -> None:
        """Capacity may have come: place the engines waiting PENDING."""
        assert isinstance(env.payload, NodeJoined)
        await self.ctx.fleet.refresh_node(env.payload.node_id)
        where = await self.ctx.store.engine_placements()
        waiting = [e for e, (state, node) in where.items() if state == S.PENDING and node is None]
        for record in oldest_first((await self.ctx.store.get_engines(waiting)).values()):
            if record.state == S.PENDING and record.node is None:
                await self.placing.place_pending(record)
