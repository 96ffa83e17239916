"""The scheduler's view of the fleet, read from Redis: live nodes with reservations and ports."""

from __future__ import annotations

from sage_mq.gpu import GIB
from sage_mq.scheduler.placement import GpuView, NodeView
from sage_mq.store import Store


async def live_nodes(store: Store) -> list[NodeView]:
    """Every node whose agent is alive, with GPU reservations and assigned ports applied.

    Two round trips whatever the fleet's size: records with liveness, then usage.
    """
    records = [record for record, alive in await store.list_nodes() if alive]
    usage = await store.node_usage([r.node_id for r in records])
    views = []
    for record in records:
        reservations, ports = usage[record.node_id]
        reserved: dict[int, float] = {}
        for reservation in reservations.values():
            for index in reservation.gpus:
                reserved[index] = reserved.get(index, 0.0) + reservation.memory_gb
        gpus = tuple(
            GpuView(g.index, g.memory_total / GIB, reserved.get(g.index, 0.0)) for g in record.gpus
        )
        views.append(
            NodeView(
                node_id=record.node_id,
                address=record.address,
                gpus=gpus,
                engines=len(set(ports.values()) | set(reservations)),
                port_range=(record.port_range_start, record.port_range_end),
                ports_in_use=frozenset(ports),
            )
        )
    return views
