"""The autoscaling policy as a plain function: tables of load, replicas and time."""

from __future__ import annotations

import pytest

from sage_mq.deployments import Autoscale
from sage_mq.scheduler.scaling import Decision, Load, Replicas, decide, needed

POLICY = Autoscale(min_replicas=1, max_replicas=4, target_in_flight=2, scale_down_after_s=60)
TO_ZERO = Autoscale(min_replicas=0, max_replicas=3, target_in_flight=2, scale_down_after_s=60)


@pytest.mark.parametrize(
    ("policy", "load", "want"),
    [
        (POLICY, Load(), 1),  # min_replicas
        (POLICY, Load(in_flight=2), 1),
        (POLICY, Load(in_flight=3), 2),  # ceil(3 / 2)
        (POLICY, Load(in_flight=5, waiting=3), 4),  # waiting counts as load
        (POLICY, Load(in_flight=40), 4),  # max_replicas
        (TO_ZERO, Load(), 0),
        (TO_ZERO, Load(waiting=1), 1),  # a held request asks for one
        (POLICY, Load(in_flight=2, batch_queued=4), 3),  # batch work in what is left
        (POLICY, Load(in_flight=8, batch_queued=100), 4),  # interactive first: batch gets none
    ],
)
def test_replicas_needed_for_a_load_within_the_bounds(
    policy: Autoscale, load: Load, want: int
) -> None:
    assert needed(policy, load) == want


@pytest.mark.parametrize(
    ("load", "replicas", "now", "low_since", "desired", "next_low_since"),
    [
        # Up at once, counting replicas still starting: a burst in a cold start asks once.
        (Load(in_flight=7), Replicas(running=1), 0, None, 4, None),
        (Load(in_flight=7), Replicas(running=1, starting=3), 0, None, 4, None),
        (Load(waiting=5), Replicas(running=0, starting=1), 0, 10.0, 3, None),
        # Steady: the low-load clock stops.
        (Load(in_flight=4), Replicas(running=2), 100, 50.0, 2, None),
        # Low: wait scale_down_after_s from when it became low, then one step.
        (Load(in_flight=1), Replicas(running=3), 100, None, 3, 100.0),
        (Load(in_flight=1), Replicas(running=3), 150, 100.0, 3, 100.0),
        (Load(in_flight=1), Replicas(running=3), 160, 100.0, 2, 100.0),
        # The next step waits for the replica being drained, then goes on at once.
        (Load(in_flight=1), Replicas(running=2, draining=1), 161, 100.0, 2, 100.0),
        (Load(in_flight=1), Replicas(running=2), 170, 100.0, 1, None),
        # Never below min_replicas; back up to it at once (a replica failed).
        (Load(), Replicas(running=1), 999, 0.0, 1, None),
        (Load(), Replicas(running=0), 0, None, 1, None),
    ],
)
def test_up_at_once_down_after_the_delay_one_step_at_a_time(
    load: Load,
    replicas: Replicas,
    now: float,
    low_since: float | None,
    desired: int,
    next_low_since: float | None,
) -> None:
    decision = decide(POLICY, load, replicas, now, low_since)
    assert (decision.desired, decision.low_since) == (desired, next_low_since), decision.reason


def test_scale_to_zero_after_the_delay_and_back_for_a_held_request() -> None:
    idle = decide(TO_ZERO, Load(), Replicas(running=1), now=0, low_since=None)
    assert (idle.desired, idle.low_since) == (1, 0)
    gone = decide(TO_ZERO, Load(), Replicas(running=1), now=60, low_since=idle.low_since)
    assert gone == Decision(0, gone.reason, None) and "one replica down" in gone.reason
    back = decide(TO_ZERO, Load(waiting=1), Replicas(), now=61, low_since=None)
    assert back.desired == 1 and "1 waiting" in back.reason


def test_each_decision_says_why() -> None:
    up = decide(POLICY, Load(in_flight=9), Replicas(running=1), 0, None)
    assert up.reason == "9 in flight, 0 waiting at 2 per replica: 1 -> 4 (max_replicas)"
    floor = decide(POLICY, Load(), Replicas(), 0, None)
    assert floor.reason == "below min_replicas (0 < 1)"
    wait = decide(POLICY, Load(), Replicas(running=2), 30, 0.0)
    assert wait.reason == "0 in flight, 0 waiting: 1 would do; down in 30 s"


@pytest.mark.parametrize(
    "bad",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": 0, "max_replicas": 0},
        {"min_replicas": -1},
        {"target_in_flight": 0},
        {"scale_down_after_s": -1},
    ],
)
def test_a_policy_that_cannot_hold_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Autoscale(**bad)  # type: ignore[arg-type]
