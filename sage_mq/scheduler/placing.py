"""Start and stop requests: place an engine, reserve its GPUs and port, launch and relaunch it."""

from __future__ import annotations

import logging

from sage_mq.engines.backends import gpu_memory_utilization
from sage_mq.errors import InvalidRequest, PlacementError
from sage_mq.messages import (
    EngineFailed,
    EnginePlaced,
    EngineStopped,
    LaunchEngine,
    StartEngine,
    StopEngine,
    TerminateEngine,
)
from sage_mq.scheduler.context import Context
from sage_mq.scheduler.placement import (
    NodeView,
    Placement,
    check_request,
    choose_port,
    demand_for,
    place,
)
from sage_mq.scheduler.tracking import Tracking
from sage_mq.store import EngineRecord, EngineState, Reservation
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
S = EngineState


class Placing:
    """Turns start requests into placed, launched engines; stop requests into terminations."""

    def __init__(self, ctx: Context, tracking: Tracking) -> None:
        self.ctx = ctx
        self.tracking = tracking
        self.left_waiting: set[str] = set()
        """Engines :meth:`place_pending` left waiting for capacity (pruned by whoever scans
        for the waiting ones, see ``NodeWatch``)."""

    async def on_start(self, req: StartEngine, env: Envelope) -> None:
        """Place and launch a new engine, or reject the request with a reason."""
        existing = await self.ctx.store.get_engine(req.engine_id)
        if existing is not None and existing.state != S.PENDING:
            if existing.state.terminal:
                await self.ctx.reject(env, req.engine_id, f"engine id {req.engine_id!r} exists")
            return  # otherwise: this request redelivered after it was carried out
        try:
            check_request(req)
        except InvalidRequest as exc:
            if existing is not None:  # the requester recorded it PENDING
                await self.ctx.store.update_engine(
                    req.engine_id, current=existing, state=S.FAILED, last_error=str(exc)
                )
            await self.ctx.reject(env, req.engine_id, str(exc))
            return
        # PENDING: recorded by the requester, or a half-done start, resumed; a request sent
        # with no record gets its record written with the launch (or the failure), at once
        record = existing or EngineRecord.pending(req.engine_id, req.spec)
        await self.start_pending(env, record, stored=existing is not None)

    async def start_pending(
        self, env: Envelope, record: EngineRecord, *, stored: bool = True
    ) -> None:
        """Place and launch a PENDING engine, or end it FAILED and reject ``env`` saying why.
        ``stored``: whether ``record`` is in Redis already."""
        try:
            placement, port = await self._place(record)
        except PlacementError as exc:
            failure = {"state": S.FAILED, "last_error": str(exc)}
            if stored:
                await self.ctx.store.update_engine(record.engine_id, current=record, **failure)
            else:
                await self.ctx.store.put_engine(record.model_copy(update=failure))
            await self.ctx.reject(env, record.engine_id, str(exc))
            await self.ctx.emit(EngineFailed(engine_id=record.engine_id, reason=str(exc)))
            return
        await self._launch_new(record, placement, port, stored=stored)

    async def _place(self, record: EngineRecord) -> tuple[Placement, int]:
        nodes = await self.ctx.fleet.live()
        placement = place(demand_for(record.spec), nodes, self.ctx.fleet.index)
        node: NodeView | None = next(n for n in nodes if n.node_id == placement.node_id)
        for _attempt in range(3):
            if node is None:
                break
            port = choose_port(node, record.requested_port)
            if await self.ctx.fleet.assign_port(node.node_id, port, record.engine_id):
                return placement, port
            node = next((n for n in await self.ctx.fleet.live() if n.node_id == node.node_id), None)
        raise PlacementError(f"could not assign a port on {placement.node_id}: ports keep changing")

    async def _launch_new(
        self, record: EngineRecord, placement: Placement, port: int, *, stored: bool = True
    ) -> None:
        """Reserve the GPUs, record the engine STARTING there and send the node its launch
        command: one round trip, all or none (the port is taken before, with HSETNX)."""
        node_id = placement.node_id
        reservation = None
        if placement.gpus:
            reservation = Reservation(
                gpus=list(placement.gpus), memory_gb=placement.memory_gb_per_gpu
            )
        fraction = None
        if record.backend == "vllm" and placement.gpus:
            fraction = gpu_memory_utilization(
                placement.memory_gb_per_gpu, placement.smallest_gpu_gb
            )
        async with self.ctx.together("launching an engine") as pipe:
            if reservation is not None:
                self.ctx.store.queue_reservation(pipe, node_id, record.engine_id, reservation)
            placed = self.ctx.store.queue_engine_update(
                pipe,
                record,
                new=not stored,
                state=S.STARTING,
                node=node_id,
                host=placement.address,
                port=port,
                url=f"http://{placement.address}:{port}",
                gpus=list(placement.gpus),
                generation=next_generation(record),
                spent_generation=next_generation(record),
                gpu_memory_utilization=fraction,
                memory_gb=placement.memory_gb_per_gpu * max(len(placement.gpus), 1),
            )
            announced = EnginePlaced(
                engine_id=record.engine_id,
                node=node_id,
                port=port,
                gpus=placement.gpus,
                memory_gb=placement.memory_gb_per_gpu,
            )
            self.ctx.queue_command(pipe, node_id, launch_command(placed), events=[announced])
        if reservation is not None:
            self.ctx.fleet.reserved(node_id, record.engine_id, reservation)
        log.info(
            "placed %s on %s port %d GPUs %s",
            record.engine_id,
            node_id,
            port,
            list(placement.gpus) or "none (CPU)",
        )

    async def relaunch(self, record: EngineRecord) -> None:
        """Launch the next generation where the engine was: same node, port, GPUs and args.

        The agent stops any older generation it still runs (TERM, grace, KILL) first, so one
        engine never becomes two.
        """
        assert record.node is not None
        relaunched = await self.ctx.store.update_engine(
            record.engine_id,
            current=record,
            state=S.STARTING,
            generation=next_generation(record),
            spent_generation=next_generation(record),
            pid=None,
        )
        assert relaunched is not None
        await self.ctx.command(record.node, launch_command(relaunched))
        log.info(
            "relaunching %s (attempt %d, generation %d) on %s port %s",
            record.engine_id,
            record.restart_attempt,
            relaunched.generation,
            record.node,
            record.port,
        )

    async def change_port(self, record: EngineRecord) -> EngineRecord:
        """Another process holds the engine's port: give it a free one on the same node.

        The old port is assigned to no engine for a while. Returns the record as it is now
        (unchanged if the engine asked for that port, or if no port is free).
        """
        node_id, old = record.node, record.port
        assert node_id is not None and old is not None
        self.ctx.fleet.mark_foreign(node_id, old)
        if record.requested_port is not None:
            return record  # asked for by the user: not ours to change
        view = next((n for n in await self.ctx.fleet.live() if n.node_id == node_id), None)
        try:
            port = choose_port(view) if view is not None else None
        except PlacementError:
            port = None
        if port is None or not await self.ctx.fleet.assign_port(node_id, port, record.engine_id):
            return record
        await self.ctx.fleet.release_port(node_id, old, record.engine_id)
        moved = await self.ctx.store.update_engine(
            record.engine_id, current=record, port=port, url=f"http://{record.host}:{port}"
        )
        assert moved is not None
        log.warning(
            "%s: port %d on %s is held by another process; moving to port %d",
            record.engine_id,
            old,
            node_id,
            port,
        )
        return moved

    async def move(self, record: EngineRecord, why: str) -> None:
        """Place an engine again, away from its lost node; PENDING with the reason if none fits.

        Nothing is sent to the lost node: when its agent is back it reports what still runs
        there, and the copy is taken back if no other serves yet, else stopped (Tracking).
        """
        old = record.node
        if old is not None:
            await self.ctx.fleet.release(old, record.engine_id, record.port)
        pending = await self.ctx.store.update_engine(
            record.engine_id,
            state=S.PENDING,
            lost_node=old,
            node=None,
            host=None,
            port=None,
            url=None,
            gpus=[],
            pid=None,
            last_error=why,
            running_since=None,
            probe_failures=0,
        )
        assert pending is not None
        if not await self.place_pending(pending):
            log.warning("%s: %s; waits PENDING for capacity", record.engine_id, why)

    async def place_pending(self, record: EngineRecord) -> bool:
        """Try to place a PENDING engine now; False (reason recorded) if nothing fits."""
        try:
            placement, port = await self._place(record)
        except PlacementError as exc:
            self.left_waiting.add(record.engine_id)
            why = (record.last_error or "").split("; waiting for capacity:")[0]
            await self.ctx.store.update_engine(
                record.engine_id, last_error=f"{why}; waiting for capacity: {exc}"
            )
            return False
        self.left_waiting.discard(record.engine_id)
        await self._launch_new(record, placement, port)
        return True

    async def on_stop(self, req: StopEngine, env: Envelope) -> None:
        """Terminate an engine (or end an unplaced one at once)."""
        record = await self.ctx.store.get_engine(req.engine_id)
        if record is None:
            await self.ctx.reject(env, req.engine_id, f"no engine {req.engine_id!r}")
            return
        if record.node is None or record.state.terminal or record.state == S.PENDING:
            await self.tracking.finish(record, S.STOPPED, None)
            await self.ctx.emit(EngineStopped(engine_id=record.engine_id, node=record.node))
            return
        await self.ctx.store.update_engine(record.engine_id, state=S.STOPPING)
        await self.ctx.command(record.node, TerminateEngine(engine_id=record.engine_id))


def launch_command(record: EngineRecord) -> LaunchEngine:
    """The launch command for the record's current generation, where it was placed."""
    assert record.host is not None and record.port is not None
    spec = record.spec.model_dump(exclude={"port", "node", "use_gpu"})
    return LaunchEngine(
        **spec,
        engine_id=record.engine_id,
        generation=record.generation,
        host=record.host,
        port=record.port,
        gpus=tuple(record.gpus),
        use_gpu=bool(record.gpus),
        gpu_memory_utilization=record.gpu_memory_utilization,
        record=record.model_dump(mode="json"),  # whole: an agent's report may rebuild it
    )


def next_generation(record: EngineRecord) -> int:
    """The generation a new launch of the engine gets: never one launched before."""
    return max(record.generation, record.spent_generation) + 1
