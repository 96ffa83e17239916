"""The restart policy as plain functions: backoff 1/2/4 s, give up, stability window, probes."""

from __future__ import annotations

import pytest

from sage_mq.scheduler.policy import (
    GiveUp,
    Restart,
    RestartPolicy,
    after_failure,
    after_probe,
    backoff_delay,
)

DEFAULT = RestartPolicy()


def test_the_contract_defaults() -> None:
    assert (
        DEFAULT.auto_restart,
        DEFAULT.max_restart_attempts,
        DEFAULT.failure_threshold,
        DEFAULT.backoff_base_s,
        DEFAULT.stability_window_s,
    ) == (True, 3, 3, 1.0, 60.0)


@pytest.mark.parametrize(("attempt", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)])
def test_backoff_is_base_times_two_to_the_attempt_minus_one(attempt: int, delay: float) -> None:
    assert backoff_delay(DEFAULT, attempt) == delay


@pytest.mark.parametrize(
    ("attempts", "running_since", "now", "expected"),
    [
        (0, None, 100.0, Restart(1, 1.0)),
        (1, 99.0, 100.0, Restart(2, 2.0)),
        (2, 99.0, 100.0, Restart(3, 4.0)),
        (3, 99.0, 100.0, GiveUp("gave up after 3 restart attempt(s)")),
        (3, 40.0, 100.0, Restart(1, 1.0)),  # ran 60 s: the streak is over
        (3, 40.1, 100.0, GiveUp("gave up after 3 restart attempt(s)")),
    ],
)
def test_after_a_failure_restart_with_backoff_or_give_up(
    attempts: int, running_since: float | None, now: float, expected: Restart | GiveUp
) -> None:
    assert (
        after_failure(DEFAULT, attempts=attempts, running_since=running_since, now=now) == expected
    )


def test_no_auto_restart_means_failed_at_once() -> None:
    off = RestartPolicy(auto_restart=False)
    assert after_failure(off, attempts=0, running_since=None, now=0) == GiveUp(
        "auto_restart is off"
    )


def test_probes_count_consecutive_failures_up_to_the_threshold() -> None:
    failures, restart = 0, False
    outcomes = []
    for healthy in (False, False, True, False, False, False):
        failures, restart = after_probe(DEFAULT, failures, healthy)
        outcomes.append((failures, restart))
    assert outcomes == [(1, False), (2, False), (0, False), (1, False), (2, False), (3, True)]
