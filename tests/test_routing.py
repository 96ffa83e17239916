"""Replica choice as plain functions: every policy, retries, and learning from outcomes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sage_mq.routing import NoReplica, Replica, Router

A, B, C = (Replica(f"e{i}", "m", f"http://h:{4000 + i}") for i in range(3))


def test_round_robin_takes_each_replica_in_turn() -> None:
    router = Router("round_robin")
    assert [router.choose([C, A, B]).engine_id for _ in range(6)] == ["e0", "e1", "e2"] * 2


def test_least_loaded_takes_the_fewest_in_flight_then_the_fastest() -> None:
    router = Router("least_loaded")
    router.started(A)
    router.started(A)
    router.started(B)
    assert router.choose([A, B, C]) == C
    router.started(C)
    router.finished(C, 0.5)
    router.finished(B, 0.1)  # both idle now: the faster wins
    assert router.choose([A, B, C]) == B


def test_adaptive_steers_away_from_a_slow_and_busy_replica() -> None:
    router = Router("adaptive", rng=random.Random(7))
    for _ in range(5):
        router.started(A)
        router.finished(A, 2.0)  # slow
        router.started(B)
        router.finished(B, 0.01)
        router.started(C)
        router.finished(C, 0.01)
    for _ in range(3):
        router.started(C)  # C is busy now
    picks = Counter(router.choose([A, B, C]).engine_id for _ in range(300))
    assert picks["e0"] == 0  # A loses every pairing it is in
    assert picks["e1"] > picks["e2"] > 0  # B wins against C; C still wins against A


def test_random_spreads_and_a_single_replica_is_always_chosen() -> None:
    router = Router("random", rng=random.Random(1))
    assert set(Counter(router.choose([A, B, C]).engine_id for _ in range(90))) == {
        "e0",
        "e1",
        "e2",
    }
    assert Router("adaptive").choose([B]) == B


@pytest.mark.parametrize("policy", ["adaptive", "round_robin", "least_loaded", "random"])
def test_a_retry_never_returns_to_an_excluded_replica(policy: str) -> None:
    router = Router(policy, rng=random.Random(3))
    for _ in range(20):
        assert router.choose([A, B, C], exclude={"e0", "e2"}) == B
    with pytest.raises(NoReplica):
        router.choose([A, B], exclude={"e0", "e1"})
    with pytest.raises(NoReplica):
        router.choose([])


def test_failures_do_not_count_as_latency_and_in_flight_never_goes_negative() -> None:
    router = Router("least_loaded")
    router.started(A)
    router.finished(A, None)
    router.finished(A, None)
    assert router.in_flight("e0") == 0
    router.forget("e0")
    assert router.in_flight("e0") == 0


def test_an_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="adaptive, round_robin, least_loaded, random"):
        Router("fastest")


def test_an_engine_moved_to_another_host_is_measured_afresh() -> None:
    router = Router("adaptive", rng=random.Random(0))
    fast, slow = Replica("a", "m", "http://h1:1", "llm"), Replica("b", "m", "http://h1:2", "llm")
    for replica, latency in ((fast, 0.01), (slow, 0.5)):
        router.started(replica)
        router.finished(replica, latency)
    assert {router.choose([fast, slow]).engine_id for _ in range(20)} == {"a"}
    moved = Replica("b", "m", "http://h2:7", "llm")  # same engine, new host: not slow any more
    assert router.choose([fast, moved]) == moved  # unmeasured: tried first
