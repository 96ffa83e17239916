"""Pure placement policy: which node, which GPUs, which port. No I/O; tested with tables."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from sage_mq.engines.argv_policy import NodeAllowances, node_refusal
from sage_mq.errors import InvalidRequest, PlacementError
from sage_mq.memory import estimate_memory_gb
from sage_mq.messages import StartEngine
from sage_mq.spec import EngineSpec


@dataclass(frozen=True)
class GpuView:
    """One GPU as the scheduler sees it: its size and what is already reserved on it."""

    index: int
    total_gb: float
    reserved_gb: float = 0.0

    @property
    def free_gb(self) -> float:
        """GiB not reserved by any engine."""
        return self.total_gb - self.reserved_gb


@dataclass(frozen=True)
class NodeView:
    """A live node: its GPUs, how many engines it holds, its port range and used ports."""

    node_id: str
    address: str
    gpus: tuple[GpuView, ...] = ()
    engines: int = 0
    port_range: tuple[int, int] = (40000, 40999)
    ports_in_use: frozenset[int] = field(default_factory=frozenset)
    allowances: NodeAllowances = field(default_factory=NodeAllowances)

    @cached_property
    def free_ascending(self) -> tuple[tuple[float, int], ...]:
        """(free GiB, index) of every GPU, least free first: a fit is a slice of it."""
        return tuple(sorted((g.free_gb, g.index) for g in self.gpus))


@dataclass(frozen=True)
class Demand:
    """What an engine needs: GPUs (count and GiB on each) or CPU, maybe on a pinned node."""

    gpu_count: int
    memory_gb_per_gpu: float
    node: str | None = None
    backend: str = "vllm"
    extra_args: tuple[str, ...] = ()
    port: int | None = None
    """A port the request asked for: only a node whose engine port range holds it will do."""

    def refusal(self, node: NodeView) -> str | None:
        """Why ``node`` will not take this engine whatever its capacity, or None."""
        if self.port is not None and not node.port_range[0] <= self.port <= node.port_range[1]:
            low, high = node.port_range
            return f"port {self.port} is outside its engine port range {low}-{high}"
        return node_refusal(self.backend, self.extra_args, node.allowances)


@dataclass(frozen=True)
class Placement:
    """Where an engine goes."""

    node_id: str
    address: str
    gpus: tuple[int, ...]
    memory_gb_per_gpu: float
    smallest_gpu_gb: float = 0.0
    """Total memory of the smallest chosen GPU (what a vLLM memory fraction is taken of)."""


def wants_gpu(kind: str, use_gpu: bool | None) -> bool:
    """use_gpu semantics: None → LLMs on GPU, embeddings on CPU; True/False as said."""
    if use_gpu is None:
        return kind == "llm"
    return use_gpu


def demand_for(spec: EngineSpec) -> Demand:
    """What an engine of this spec needs of a node: GPUs and memory on each, and the node,
    backend, arguments and port it asked for."""
    gpu_count = spec.tensor_parallel_size * spec.pipeline_parallel_size
    if not wants_gpu(spec.kind, spec.use_gpu):
        gpu_count = 0
    backend = spec.resolved_backend
    total_gb = estimate_memory_gb(
        spec.model, kind=spec.kind, backend=backend, required_memory_gb=spec.required_memory_gb
    )
    return Demand(
        gpu_count,
        total_gb / max(gpu_count, 1),
        spec.node,
        backend=backend,
        extra_args=tuple(spec.extra_args),
        port=spec.port,
    )


def check_request(req: StartEngine) -> None:
    """Refuse requests that can never be placed as written, with what to change."""
    parallel = req.tensor_parallel_size * req.pipeline_parallel_size > 1
    if parallel and not wants_gpu(req.kind, req.use_gpu):
        raise InvalidRequest(
            f"{req.engine_id}: tensor/pipeline parallelism needs GPUs, and this "
            f"{req.kind} engine would run on the CPU; add --use-gpu, or set -tp 1"
        )


Fit = tuple[NodeView, int, int]
"""A node and the slice of its ``free_ascending`` GPUs an engine would take."""


def place(demand: Demand, nodes: Sequence[NodeView], index: FreeIndex | None = None) -> Placement:
    """Choose a node (and GPUs) for an engine, or raise :class:`PlacementError` saying why.

    Best fit: the tightest GPUs that hold it, least GiB left over (ties: the first node id).
    With an ``index`` of the same nodes it looks only at GPUs that hold the engine, from the
    tightest up; without one it looks at every node. Both choose the same."""
    count, need = demand.gpu_count, demand.memory_gb_per_gpu
    if index is not None and len(index) != len(nodes):
        index = None  # not of these nodes
    if index is not None and count and nodes and demand.node is None and index.all_take(demand):
        candidates: Sequence[NodeView] = nodes  # the common case: judged by kind of node
        chosen = index.best_fit(count, need, None)
    else:
        candidates = _candidates(demand, nodes)
        if count == 0:
            fewest = min(candidates, key=lambda n: (n.engines, n.node_id))
            return Placement(fewest.node_id, fewest.address, (), 0.0)
        if index is None:
            chosen = _scan(candidates, count, need)
        else:
            chosen = index.best_fit(count, need, {n.node_id for n in candidates})
    if chosen is None:
        raise PlacementError(_no_gpu_fits(demand, candidates))
    target, start, end = chosen
    gpus = tuple(sorted(i for _free, i in target.free_ascending[start:end]))
    smallest = min(g.total_gb for g in target.gpus if g.index in gpus)
    return Placement(target.node_id, target.address, gpus, need, smallest)


def _scan(candidates: Sequence[NodeView], count: int, need: float) -> Fit | None:
    best_left, best_id, chosen = math.inf, "", None
    for node in candidates:
        fit = _node_fit(node, count, need)
        if fit is not None and (
            fit[0] < best_left or (fit[0] == best_left and node.node_id < best_id)
        ):
            best_left, best_id, chosen = fit[0], node.node_id, (node, fit[1], fit[2])
    return chosen


def _node_fit(node: NodeView, count: int, need: float) -> tuple[float, int, int] | None:
    """The GiB ``node`` would leave over on its tightest ``count`` GPUs that hold ``need``
    each, and where those are in its ``free_ascending``; None if it has too few."""
    free = node.free_ascending
    start = bisect_left(free, (need - 1e-9, -1))
    end = start + count
    if end > len(free):
        return None
    left = free[start][0] - need if count == 1 else _sum_free(free[start:end]) - count * need
    return left, start, end


def _sum_free(fit: Sequence[tuple[float, int]]) -> float:
    return sum(free for free, _index in fit)


class FreeIndex:
    """Every GPU of a set of nodes, ordered by free GiB, for best fit without a look at every
    node: from the first GPU that holds the engine up, each node is judged at its tightest GPU
    that does, and the walk stops once a node's GPUs could only leave more over than the best
    fit found (``count`` GPUs of at least that much free each), or as much with a later node id
    (GPUs of equal free GiB come in node id order, and ties go to the first). At 1,000 nodes a
    placement then judges a few nodes, not 1,000. The scheduler's picture of the fleet keeps
    one up to date, node by node, as placements change them."""

    _TOLERANCE = 1e-6

    def __init__(self, nodes: Sequence[NodeView] = ()) -> None:
        self._nodes: dict[str, NodeView] = {}
        self._kinds: dict[tuple[tuple[int, int], NodeAllowances], dict[str, NodeView]] = {}
        """Nodes by what decides whether they take an engine at all (port range, allowances):
        a fleet has a few kinds, so a demand is judged a few times, not once per node."""
        for n in nodes:
            self._add(n)
        self._gpus = sorted(
            (free, n.node_id, i) for n in self._nodes.values() for free, i in n.free_ascending
        )

    def __len__(self) -> int:
        return len(self._nodes)

    def put(self, node: NodeView) -> None:
        """Add a node, or replace what the index holds of it."""
        self.drop(node.node_id)
        self._add(node)
        for free, i in node.free_ascending:
            insort(self._gpus, (free, node.node_id, i))

    def drop(self, node_id: str) -> None:
        old = self._nodes.pop(node_id, None)
        if old is None:
            return
        for free, i in old.free_ascending:
            del self._gpus[bisect_left(self._gpus, (free, node_id, i))]
        kind = (old.port_range, old.allowances)
        del self._kinds[kind][node_id]
        if not self._kinds[kind]:
            del self._kinds[kind]

    def all_take(self, demand: Demand) -> bool:
        """Whether every node would take the engine, capacity aside."""
        return all(demand.refusal(next(iter(k.values()))) is None for k in self._kinds.values())

    def _add(self, node: NodeView) -> None:
        self._nodes[node.node_id] = node
        self._kinds.setdefault((node.port_range, node.allowances), {})[node.node_id] = node

    def best_fit(self, count: int, need: float, allowed: Container[str] | None) -> Fit | None:
        """What :func:`place` would choose among the nodes (those ``allowed``, if given)."""
        best_left, best_id, chosen = math.inf, "", None
        judged: set[str] = set()
        gpus = self._gpus
        for position in range(bisect_left(gpus, (need - 1e-9,)), len(gpus)):
            free, node_id, _i = gpus[position]
            bound = count * (free - need)  # the least this node, and every one after, leaves
            if bound > best_left + self._TOLERANCE or (
                bound >= best_left - self._TOLERANCE and node_id > best_id
            ):
                break  # none after can fit tighter; at most as tight, with a later node id
            if node_id in judged or (allowed is not None and node_id not in allowed):
                continue
            judged.add(node_id)
            fit = _node_fit(self._nodes[node_id], count, need)
            if fit is not None and (
                fit[0] < best_left or (fit[0] == best_left and node_id < best_id)
            ):
                best_left, best_id, chosen = fit[0], node_id, (self._nodes[node_id], fit[1], fit[2])
        return chosen


def _candidates(demand: Demand, nodes: Sequence[NodeView]) -> list[NodeView]:
    """The live nodes that would take the engine (pinned, allowed), or why there are none."""
    pinned = [n for n in nodes if demand.node is None or n.node_id == demand.node]
    if not pinned:
        if demand.node is not None:
            live = ", ".join(sorted(n.node_id for n in nodes)) or "none"
            raise PlacementError(f"node {demand.node!r} is not live (live nodes: {live})")
        raise PlacementError("no live node: start one with `sage llm node run --node-id ID`")
    # Nodes of one fleet mostly share their port range and allowances: judge each kind once
    # (at 1,000 nodes this was most of a placement's cost), and a run of nodes of the kind just
    # judged without even a look-up (the fleet's picture shares one object among equals).
    judged: dict[tuple[tuple[int, int], NodeAllowances], str | None] = {}
    allowed, refused = [], set()
    last: tuple[tuple[int, int], NodeAllowances] | None = None
    refusal: str | None = None
    for n in pinned:
        if last is None or n.allowances is not last[1] or n.port_range != last[0]:
            last = (n.port_range, n.allowances)
            if last not in judged:
                judged[last] = demand.refusal(n)
            refusal = judged[last]
        if refusal is None:
            allowed.append(n)
        else:
            refused.add(refusal)
    if not allowed:
        reasons = sorted(refused)
        where = f"node {demand.node!r}" if demand.node else f"none of {len(pinned)} live node(s)"
        raise PlacementError(f"{where} will take it: {'; '.join(reasons[:3])}")
    return allowed


_LISTED = 8
"""Nodes named in a "no GPU fits" error (those with the most free memory)."""


def _no_gpu_fits(demand: Demand, nodes: Sequence[NodeView]) -> str:
    need = (
        f"no GPU fits: needs {demand.gpu_count} GPU(s) with "
        f"≥{demand.memory_gb_per_gpu:.1f} GiB free each on one node"
    )
    roomiest = sorted(
        nodes, key=lambda n: (-max((g.free_gb for g in n.gpus), default=0.0), n.node_id)
    )
    seen = []
    for n in sorted(roomiest[:_LISTED], key=lambda n: n.node_id):
        if not n.gpus:
            seen.append(f"{n.node_id}: no GPUs")
            continue
        free = ", ".join(f"{g.free_gb:.1f}" for g in n.gpus)
        seen.append(f"{n.node_id}: {len(n.gpus)} GPU(s), free GiB [{free}]")
    if len(nodes) > _LISTED:
        seen.append(f"and {len(nodes) - _LISTED} more live node(s) with less free")
    return f"{need}; {'; '.join(seen)}"


def with_engine(node: NodeView, placement: Placement, port: int) -> NodeView:
    """The node as it would be with one more engine placed on it (a plan of several)."""
    gpus = tuple(
        replace(g, reserved_gb=g.reserved_gb + placement.memory_gb_per_gpu)
        if g.index in placement.gpus
        else g
        for g in node.gpus
    )
    return replace(
        node, gpus=gpus, engines=node.engines + 1, ports_in_use=node.ports_in_use | {port}
    )


def choose_port(node: NodeView, requested: int | None = None) -> int:
    """The requested port if free, else the lowest free port of the node's range."""
    low, high = node.port_range
    if requested is not None:
        if requested in node.ports_in_use:
            raise PlacementError(f"port {requested} is already assigned on node {node.node_id}")
        return requested
    for port in range(low, high + 1):
        if port not in node.ports_in_use:
            return port
    raise PlacementError(f"no free port left on node {node.node_id} in {low}-{high}")
