"""``preset apply --dry-run``: what applying a preset would do on the fleet as it is now.

The engines are placed one after the other by the scheduler's own placement (the same demand,
the same fit, the same node rules: runtimes, allowed flags, port ranges), each on the fleet as
the ones before it would leave it. Nothing is written to Redis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sage_mq.errors import PlacementError
from sage_mq.presets import Preset
from sage_mq.scheduler.placement import NodeView, choose_port, demand_for, place, with_engine
from sage_mq.store import EngineRecord


@dataclass(frozen=True)
class Step:
    """What applying would do with one engine of the preset."""

    engine_id: str
    model: str
    kind: str
    action: str
    """``start`` (a new engine), ``restart`` (a STOPPED or FAILED one), ``keep`` (already
    there: left as it is) or ``refused`` (it would not start: see ``reason``)."""
    node: str | None = None
    gpus: tuple[int, ...] = ()
    port: int | None = None
    reason: str | None = None


def plan(
    preset: Preset, nodes: Sequence[NodeView], existing: Mapping[str, EngineRecord]
) -> list[Step]:
    """The steps of applying ``preset`` on live ``nodes`` with these engines already there."""
    fleet = {n.node_id: n for n in nodes}
    steps = []
    for engine in preset.engines:
        engine_id = preset.engine_id(engine)
        about = (engine_id, engine.model, engine.kind)
        record = existing.get(engine_id)
        if record is not None and not record.state.terminal:
            where = (record.node, tuple(record.gpus), record.port)
            steps.append(Step(*about, "keep", *where, reason=record.state.value))
            continue
        spec = record.spec if record is not None else engine.spec_in(preset.name)
        try:
            placement = place(demand_for(spec), list(fleet.values()))
            node = fleet[placement.node_id]
            port = choose_port(node, spec.port)
        except PlacementError as exc:
            steps.append(Step(*about, "refused", reason=str(exc)))
            continue
        fleet[node.node_id] = with_engine(node, placement, port)
        action = "restart" if record is not None else "start"
        steps.append(Step(*about, action, node.node_id, placement.gpus, port))
    return steps
