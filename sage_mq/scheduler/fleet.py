"""The leader's picture of the fleet for placement: live nodes, GPU reservations, ports.

Placing one engine must not read every node of a 1,000-node fleet from Redis, so the picture is
kept in memory. It is read in full when a scheduler starts to lead. Each tick then reads which
nodes exist and their liveness keys (whose value is the agent's epoch), and reads again the nodes
that are new or whose agent restarted, plus a thirtieth of the others in turn; a node that joins
is read at once; the scheduler's own writes of ports and reservations are applied as it makes
them. Redis stays the truth: a port is taken with HSETNX, so a stale picture costs a retry,
never a double booking, and anything written behind the leader's back (a deposed leader
finishing a handler) is seen within 30 ticks.
"""

from __future__ import annotations

import math
import time

from sage_mq.engines.argv_policy import NodeAllowances
from sage_mq.gpu import GIB
from sage_mq.scheduler.placement import FreeIndex, GpuView, NodeView
from sage_mq.store import NodeRecord, Reservation, Store

FOREIGN_TTL_S = 600.0


class FleetView:
    """Node records with liveness, reservations and assigned ports, as placement needs them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._records: dict[str, NodeRecord] = {}
        self._alive: dict[str, bool] = {}
        self._reservations: dict[str, dict[str, Reservation]] = {}
        self._ports: dict[str, dict[int, str]] = {}
        self._views: dict[str, NodeView] = {}
        self._foreign: dict[str, dict[int, float]] = {}
        """Node -> port -> until when: ports found held by processes that are not ours."""
        self._live: dict[str, NodeView] | None = None
        """The live nodes' views :meth:`live` gave last; None: make them all again (a node's
        liveness changed, or one left)."""
        self._dirty: set[str] = set()
        """Nodes whose views changed since (a placement's port and GPUs): made again alone."""
        self.index = FreeIndex()
        """The live nodes' GPUs by free GiB (see :class:`FreeIndex`), kept with :meth:`live`."""
        self._foreign_due = math.inf
        """When the first port held by another process is free again (the views change)."""
        self._loaded = False
        self._next = 0
        """Where the rolling re-read goes on at the next look."""

    def forget(self) -> None:
        """Read everything again before the next placement (a new leader, a test run)."""
        self._loaded = False

    async def look(self, share: float = 1 / 30) -> list[tuple[NodeRecord, bool]]:
        """The tick's look: every node record with whether its agent is alive.

        Reads node ids and liveness keys, then in full the nodes that are new or whose agent
        restarted, and the reservations and ports of ``share`` of the others in turn (so each
        is re-read every 30 ticks without one tick paying for the whole fleet).
        """
        if not self._loaded:
            return await self.refresh()
        epochs = await self.store.node_epochs()
        ids = sorted(epochs)
        rolling = ids[self._next : self._next + max(1, round(len(ids) * share))]
        self._next = self._next + len(rolling) if self._next + len(rolling) < len(ids) else 0
        changed = {
            node_id
            for node_id, epoch in epochs.items()
            if node_id not in self._records
            or (epoch is not None and epoch >= 0 and epoch != self._records[node_id].epoch)
        }
        await self._read(sorted(changed))
        await self._read_usage([node_id for node_id in rolling if node_id in self._records])
        for node_id in set(self._records) - set(epochs):
            self._drop(node_id)
        for node_id, epoch in epochs.items():
            if node_id in self._records and self._alive.get(node_id) != (epoch is not None):
                self._alive[node_id] = epoch is not None
                self._live = None
        return [(self._records[n], self._alive[n]) for n in sorted(self._records)]

    async def set_status(self, node_id: str, status: str) -> None:
        """Mark a node ``up`` or ``lost``, in Redis and here."""
        await self.store.set_node_status(node_id, status)
        record = self._records.get(node_id)
        if record is not None:
            self._records[node_id] = record.model_copy(update={"status": status})

    async def refresh(self) -> list[tuple[NodeRecord, bool]]:
        """Read every node, its liveness and usage from Redis; returns the node listing."""
        listed = await self.store.list_nodes()
        usage = await self.store.node_usage([record.node_id for record, _alive in listed])
        self._records = {record.node_id: record for record, _alive in listed}
        self._alive = {record.node_id: alive for record, alive in listed}
        self._reservations = {node_id: held for node_id, (held, _ports) in usage.items()}
        self._ports = {node_id: ports for node_id, (_held, ports) in usage.items()}
        self._views, self._live = {}, None
        self._loaded = True
        return listed

    async def refresh_node(self, node_id: str) -> None:
        """Read one node again (it joined, or a port it was thought to have free was taken)."""
        if not self._loaded:
            await self.refresh()
            return
        await self._read([node_id])
        if node_id in self._records:
            self._alive[node_id] = await self.store.is_alive(node_id)
            self._live = None

    async def _read(self, node_ids: list[str]) -> None:
        if not node_ids:
            return
        records = await self.store.get_nodes(node_ids)
        usage = await self.store.node_usage(node_ids)
        for node_id in node_ids:
            record = records.get(node_id)
            if record is None:
                self._drop(node_id)
                continue
            self._records[node_id] = record
            self._alive.setdefault(node_id, True)
            self._reservations[node_id], self._ports[node_id] = usage[node_id]
            self._stale(node_id)

    async def _read_usage(self, node_ids: list[str]) -> None:
        if not node_ids:
            return
        for node_id, (held, ports) in (await self.store.node_usage(node_ids)).items():
            if (held, ports) != (self._reservations.get(node_id), self._ports.get(node_id)):
                self._reservations[node_id], self._ports[node_id] = held, ports
                self._stale(node_id)

    def _drop(self, node_id: str) -> None:
        for table in (self._records, self._alive, self._reservations, self._ports, self._views):
            table.pop(node_id, None)
        self._live = None

    def _stale(self, node_id: str) -> None:
        """The node's view is to be made again, at the next :meth:`live`."""
        self._views.pop(node_id, None)
        self._dirty.add(node_id)

    async def live(self) -> list[NodeView]:
        """Every node alive at the last look, with its reservations and ports applied.

        A placement changes one node: only its view is made again (at 1,000 nodes, making
        them all cost more than choosing among them)."""
        if not self._loaded:
            await self.refresh()
        if self._live is None or time.monotonic() >= self._foreign_due:
            self._live = {n: self._view(n) for n, alive in self._alive.items() if alive}
            self.index = FreeIndex(list(self._live.values()))
            self._foreign_due = min(
                (min(held.values()) for held in self._foreign.values() if held), default=math.inf
            )
        else:
            for node_id in self._dirty:
                if self._alive.get(node_id):
                    self._live[node_id] = view = self._view(node_id)
                    self.index.put(view)
                else:
                    self._live.pop(node_id, None)
                    self.index.drop(node_id)
        self._dirty.clear()
        return list(self._live.values())

    async def assign_port(self, node_id: str, port: int, engine_id: str) -> bool:
        """Take a port in Redis; on success the picture has it, on failure it is read again."""
        if await self.store.assign_port(node_id, port, engine_id):
            self._ports.setdefault(node_id, {})[port] = engine_id
            self._stale(node_id)
            return True
        await self.refresh_node(node_id)
        return False

    async def reserve_gpus(self, node_id: str, engine_id: str, reservation: Reservation) -> None:
        await self.store.reserve_gpus(node_id, engine_id, reservation)
        self.reserved(node_id, engine_id, reservation)

    def reserved(self, node_id: str, engine_id: str, reservation: Reservation) -> None:
        """A reservation written (with other writes, see ``Store.queue_reservation``): the
        picture has it."""
        self._reservations.setdefault(node_id, {})[engine_id] = reservation
        self._stale(node_id)

    async def release(self, node_id: str, engine_id: str, port: int | None) -> None:
        """Give back an engine's port (if it holds it) and GPU reservation on a node."""
        if port is not None:
            await self.release_port(node_id, port, engine_id)
        await self.store.release_gpus(node_id, engine_id)
        self._reservations.get(node_id, {}).pop(engine_id, None)
        self._stale(node_id)

    async def release_port(self, node_id: str, port: int, engine_id: str) -> None:
        """Give back a port, if this engine holds it."""
        await self.store.release_port(node_id, port, engine_id)
        if self._ports.get(node_id, {}).get(port) == engine_id:
            del self._ports[node_id][port]
        self._stale(node_id)

    def mark_foreign(self, node_id: str, port: int, now: float | None = None) -> None:
        """Another process holds this port: assign it to no engine for ``FOREIGN_TTL_S``."""
        now = time.monotonic() if now is None else now
        self._foreign.setdefault(node_id, {})[port] = now + FOREIGN_TTL_S
        self._foreign_due = min(self._foreign_due, now + FOREIGN_TTL_S)
        self._stale(node_id)

    def _view(self, node_id: str) -> NodeView:
        view = self._views.get(node_id)
        foreign = self._foreign.get(node_id)
        if foreign and min(foreign.values()) < time.monotonic():  # some are free again
            self._foreign[node_id] = foreign = {
                p: until for p, until in foreign.items() if until >= time.monotonic()
            }
            view = None
        if view is None:
            view = self._views[node_id] = node_view(
                self._records[node_id],
                self._reservations.get(node_id, {}),
                self._ports.get(node_id, {}),
                foreign or {},
            )
        return view


def node_view(
    record: NodeRecord,
    reservations: dict[str, Reservation],
    ports: dict[int, str],
    foreign: dict[int, float],
) -> NodeView:
    """What placement sees of one node (ports held by other processes count as in use)."""
    reserved: dict[int, float] = {}
    for reservation in reservations.values():
        for index in reservation.gpus:
            reserved[index] = reserved.get(index, 0.0) + reservation.memory_gb
    gpus = tuple(
        GpuView(g.index, g.memory_total / GIB, reserved.get(g.index, 0.0)) for g in record.gpus
    )
    return NodeView(
        node_id=record.node_id,
        address=record.address,
        gpus=gpus,
        engines=len(set(ports.values()) | set(reservations)),
        port_range=(record.port_range_start, record.port_range_end),
        ports_in_use=frozenset(ports).union(foreign),
        allowances=_shared(
            NodeAllowances(
                commands=frozenset(record.allowed_commands),
                engine_flags=frozenset(record.allowed_engine_flags),
                backends=None if record.runtimes is None else frozenset(record.runtimes),
            )
        ),
    )


_ALLOWANCES: dict[NodeAllowances, NodeAllowances] = {}


def _shared(allowances: NodeAllowances) -> NodeAllowances:
    """One object for equal allowances (a fleet's nodes mostly share theirs): placement tells
    them apart by identity, at no cost per node."""
    if len(_ALLOWANCES) > 1024:  # operators changing allowances for ever: start again
        _ALLOWANCES.clear()
    return _ALLOWANCES.setdefault(allowances, allowances)
