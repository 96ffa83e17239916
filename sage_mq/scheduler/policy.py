"""Pure restart policy: when an engine has failed, restart it (after which delay) or give up."""

from __future__ import annotations

from dataclasses import dataclass

from sage_mq.settings import RestartPolicy

__all__ = ["GiveUp", "Restart", "RestartPolicy", "after_failure", "after_probe", "backoff_delay"]


@dataclass(frozen=True)
class Restart:
    """Launch the engine again as attempt ``attempt`` after ``delay_s`` seconds."""

    attempt: int
    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    """Do not restart: the engine becomes FAILED for ``reason``."""

    reason: str


def backoff_delay(policy: RestartPolicy, attempt: int) -> float:
    """``base * 2**(attempt-1)``: 1 s, 2 s, 4 s … with the default base."""
    return float(policy.backoff_base_s * 2.0 ** (attempt - 1))


def attempts_in_streak(
    policy: RestartPolicy, attempts: int, running_since: float | None, now: float
) -> int:
    """Attempts that still count: none once the engine ran for the stability window."""
    if running_since is not None and now - running_since >= policy.stability_window_s:
        return 0
    return attempts


def after_failure(
    policy: RestartPolicy, *, attempts: int, running_since: float | None, now: float
) -> Restart | GiveUp:
    """What to do about an engine that exited or turned unhealthy."""
    if not policy.auto_restart:
        return GiveUp("auto_restart is off")
    done = attempts_in_streak(policy, attempts, running_since, now)
    if done >= policy.max_restart_attempts:
        return GiveUp(f"gave up after {done} restart attempt(s)")
    attempt = done + 1
    return Restart(attempt, backoff_delay(policy, attempt))


def after_probe(policy: RestartPolicy, failures: int, healthy: bool) -> tuple[int, bool]:
    """Consecutive failures after one probe, and whether the engine is now to be restarted."""
    if healthy:
        return 0, False
    failures += 1
    return failures, failures >= policy.failure_threshold
