"""Placement policy as plain functions: use_gpu semantics, best fit, TP, pins, ports, reasons."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from pydantic import ValidationError

from sage_mq.engines.argv_policy import NodeAllowances
from sage_mq.errors import InvalidRequest, PlacementError
from sage_mq.messages import StartEngine
from sage_mq.scheduler.placement import (
    Demand,
    FreeIndex,
    GpuView,
    NodeView,
    check_request,
    choose_port,
    place,
    wants_gpu,
)


@pytest.mark.parametrize(
    ("kind", "use_gpu", "expected"),
    [
        ("llm", None, True),
        ("embedding", None, False),
        ("llm", True, True),
        ("embedding", True, True),
        ("llm", False, False),
        ("embedding", False, False),
    ],
)
def test_use_gpu_none_means_llm_on_gpu_and_embedding_on_cpu(
    kind: str, use_gpu: bool | None, expected: bool
) -> None:
    assert wants_gpu(kind, use_gpu) is expected


def node(node_id: str, *free_and_total: tuple[float, float], engines: int = 0) -> NodeView:
    gpus = tuple(GpuView(i, total, total - free) for i, (free, total) in enumerate(free_and_total))
    return NodeView(node_id, f"10.0.0.{len(node_id)}", gpus, engines)


def test_best_fit_picks_the_tightest_gpus_that_hold_the_engine() -> None:
    nodes = [node("a", (80, 80), (80, 80)), node("b", (20, 24), (10, 24))]
    placed = place(Demand(1, 8.0), nodes)
    assert (placed.node_id, placed.gpus) == ("b", (1,))


def test_tensor_parallel_takes_that_many_gpus_on_one_node() -> None:
    nodes = [node("a", (24, 24)), node("b", (24, 24), (24, 24))]
    placed = place(Demand(2, 10.0), nodes)
    assert (placed.node_id, placed.gpus) == ("b", (0, 1))
    assert placed.smallest_gpu_gb == 24


def test_no_gpu_fits_says_what_was_needed_and_what_each_node_has() -> None:
    with pytest.raises(PlacementError) as err:
        place(Demand(2, 30.0), [node("a", (24, 24), (24, 24)), node("cpu")])
    message = str(err.value)
    assert "no GPU fits" in message and "2 GPU(s)" in message and "30.0 GiB" in message
    assert "a: 2 GPU(s), free GiB [24.0, 24.0]" in message and "cpu: no GPUs" in message


def test_cpu_engines_go_to_the_node_with_fewest_engines() -> None:
    nodes = [node("a", engines=3), node("b", engines=1), node("c", engines=1)]
    assert place(Demand(0, 0.0), nodes).node_id == "b"


def test_a_pinned_node_is_used_or_the_request_is_refused() -> None:
    nodes = [node("a", (24, 24)), node("b", (24, 24))]
    assert place(Demand(1, 1.0, node="b"), nodes).node_id == "b"
    with pytest.raises(PlacementError, match="node 'z' is not live"):
        place(Demand(1, 1.0, node="z"), nodes)


def test_no_live_node_is_refused_with_how_to_start_one() -> None:
    with pytest.raises(PlacementError, match="sage llm node run"):
        place(Demand(0, 0.0), [])


def test_reservations_count_against_free_memory() -> None:
    full = NodeView("a", "h", (GpuView(0, 24.0, 20.0),))
    with pytest.raises(PlacementError):
        place(Demand(1, 5.0), [full])
    assert place(Demand(1, 4.0), [full]).gpus == (0,)


@pytest.mark.parametrize(
    ("in_use", "requested", "expected"),
    [(set(), None, 40000), ({40000, 40001}, None, 40002), ({40000}, 40005, 40005)],
)
def test_ports_come_from_the_node_range(
    in_use: set[int], requested: int | None, expected: int
) -> None:
    view = NodeView("a", "h", port_range=(40000, 40009), ports_in_use=frozenset(in_use))
    assert choose_port(view, requested) == expected


def test_a_taken_or_exhausted_port_is_refused() -> None:
    view = NodeView("a", "h", port_range=(40000, 40001), ports_in_use=frozenset({40000, 40001}))
    with pytest.raises(PlacementError, match="already assigned"):
        choose_port(view, 40000)
    with pytest.raises(PlacementError, match="no free port"):
        choose_port(view)


def test_requests_that_can_never_run_are_refused_up_front() -> None:
    with pytest.raises(InvalidRequest, match="needs GPUs"):
        check_request(StartEngine(engine_id="e", model="m", use_gpu=False, tensor_parallel_size=2))
    embedding_on_cpu = StartEngine(
        engine_id="e", model="m", kind="embedding", pipeline_parallel_size=2
    )
    with pytest.raises(InvalidRequest, match="would run on the CPU; add --use-gpu"):
        check_request(embedding_on_cpu)  # (its GPUs were silently dropped before)
    check_request(embedding_on_cpu.model_copy(update={"use_gpu": True}))
    with pytest.raises(ValidationError, match="argv template"):
        StartEngine(engine_id="e", model="m", backend="command")
    check_request(StartEngine(engine_id="e", model="m", backend="command", extra_args=("x",)))


def test_placement_keeps_to_the_nodes_that_allow_what_the_engine_needs() -> None:
    plain = NodeView("plain", "h")
    trusting = NodeView(
        "trusting", "h", allowances=NodeAllowances(engine_flags=frozenset({"--trust-remote-code"}))
    )
    runs_llama = NodeView(
        "llama",
        "h",
        allowances=NodeAllowances(commands=frozenset({"llama-server", "/usr/bin/llama-server"})),
    )
    nodes = [plain, trusting, runs_llama]
    remote_code = Demand(0, 0, extra_args=("--trust-remote-code",))
    assert place(remote_code, nodes).node_id == "trusting"
    command = Demand(0, 0, backend="command", extra_args=("llama-server", "--port", "{port}"))
    assert place(command, nodes).node_id == "llama"
    with pytest.raises(PlacementError, match=r"none of 3 live node.*--allow-command /bin/sh"):
        place(Demand(0, 0, backend="command", extra_args=("/bin/sh", "-c", "id")), nodes)
    with pytest.raises(PlacementError, match=r"node 'plain' will take it.*--allow-engine-flag"):
        place(Demand(0, 0, node="plain", extra_args=("--trust-remote-code",)), nodes)


def test_a_requested_port_is_taken_only_from_a_range_that_holds_it() -> None:
    low = NodeView("low", "h", port_range=(40000, 40999))
    high = NodeView("high", "h", port_range=(50000, 50999))
    assert place(Demand(0, 0, port=50010), [low, high]).node_id == "high"
    with pytest.raises(PlacementError, match="port 22 is outside its engine port range"):
        place(Demand(0, 0, port=22), [low, high])


def test_no_fit_names_the_roomiest_nodes_not_the_whole_fleet() -> None:
    nodes = [NodeView(f"n{i:04d}", "h", gpus=(GpuView(0, 24, 24 - i % 20),)) for i in range(1000)]
    with pytest.raises(PlacementError) as err:
        place(Demand(1, 30), nodes)
    message = str(err.value)
    assert message.count("GPU(s), free GiB") == 8 and "and 992 more live node(s)" in message
    assert "n0019: 1 GPU(s), free GiB [19.0]" in message  # the most free memory is named


def random_fleet(rng: random.Random, size: int) -> list[NodeView]:
    """Nodes of 1-8 GPUs of a few sizes, partly reserved in steps that make ties common."""
    fleet = []
    for i in range(size):
        total = rng.choice((24.0, 48.0, 80.0))
        frees = [
            rng.choice((0.0, 10.0, 20.0, 24.0, total / 2, total)) for _ in range(rng.randint(1, 8))
        ]
        fleet.append(
            node(f"n{rng.randrange(10_000):04d}-{i}", *((min(f, total), total) for f in frees))
        )
    return fleet


@pytest.mark.parametrize("seed", range(40))
def test_the_free_index_chooses_what_a_look_at_every_node_chooses(seed: int) -> None:
    rng = random.Random(seed)
    nodes = random_fleet(rng, rng.randint(1, 60))
    refused = NodeAllowances(backends=frozenset({"llamacpp"}))  # no vllm: never a candidate
    nodes = [replace(n, allowances=refused) if rng.random() < 0.2 else n for n in nodes]
    index = FreeIndex(nodes)
    for _ in range(30):
        demand = Demand(rng.choice((1, 1, 2, 4)), rng.choice((5.0, 10.0, 12.0, 20.0, 24.0, 40.0)))
        if rng.random() < 0.1:
            demand = replace(demand, node=rng.choice(nodes).node_id)
        try:
            expected = place(demand, nodes)
        except PlacementError as exc:
            with pytest.raises(PlacementError) as raised:
                place(demand, nodes, index)
            assert str(raised.value) == str(exc)
            continue
        assert place(demand, nodes, index) == expected
        # The engine goes there: the index follows the one node that changed.
        taken = {i: expected.memory_gb_per_gpu for i in expected.gpus}
        (target,) = [n for n in nodes if n.node_id == expected.node_id]
        changed = replace(
            target,
            gpus=tuple(
                replace(g, reserved_gb=g.reserved_gb + taken.get(g.index, 0.0)) for g in target.gpus
            ),
        )
        nodes = [changed if n is target else n for n in nodes]
        index.put(changed)
    index.drop(nodes[0].node_id)
    rest = nodes[1:]
    for count, need in ((1, 10.0), (2, 20.0)):
        try:
            expected = place(Demand(count, need), rest)
        except PlacementError:
            continue
        assert place(Demand(count, need), rest, index) == expected
