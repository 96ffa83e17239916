"""The chaos suite: a loaded fleet of real processes takes every fault in turn, then a seeded
random mix; after each, the fleet must be whole again.

Whole means: every engine RUNNING (or FAILED with a reason), each RUNNING engine its process
and the worker it forked and nothing else (no duplicate, no stale or hung copy, nothing left of
a dead engine), ports and GPU reservations held by exactly the
engines that run, the gateway answering chat and embeddings, the round's start and stop carried
out (0 lost commands), the round's batch with each result exactly once and none failed, nothing
dead-lettered, no actor dead that was not killed, and no engine restarted but the one hit (an
agent, scheduler, gateway or Redis coming back adopts what runs). Redis runs under Sentinel (a
primary, a replica, three sentinels), so a primary failover is one of the faults.
``SAGE_MQ_CHAOS_SEED`` and ``SAGE_MQ_CHAOS_ROUNDS`` change the mix; ``pytest tests/chaos -s``
shows the table.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.checks import dead_letters, problems
from tests.chaos.faults import FAULTS, Fault
from tests.chaos.harness import ChaosFleet
from tests.chaos.load import Batches, Load
from tests.helpers.gateway import wait_for
from tests.helpers.servers import Processes

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1500)]
SEED = int(os.environ.get("SAGE_MQ_CHAOS_SEED", "6"))
ROUNDS = int(os.environ.get("SAGE_MQ_CHAOS_ROUNDS", "10"))
RECOVERY_DEADLINE_S = 90.0


@dataclass
class Outcome:
    fault: str
    hit: str
    recovery_s: float
    answers: dict[str, int]
    problems: list[str] = field(default_factory=list)


class Rounds:
    """Runs one fault at a time on a loaded fleet and checks it is whole afterwards."""

    def __init__(self, fleet: ChaosFleet, load: Load) -> None:
        self.fleet = fleet
        self.load = load
        self.batches = Batches(fleet)
        self.expected: dict[str, str] = {}
        self.outcomes: list[Outcome] = []
        self.log: list[str] = []

    def start_engines(self) -> None:
        for model, kind in (("demo", "llm"), ("demo", "llm"), ("mini", "embedding")):
            record = self.fleet.procs.json(*_start(model, kind), "--wait")
            self.expected[record["engine_id"]] = "RUNNING"

    def run(self, fault: Fault, rng: random.Random) -> Outcome:
        self.load.take()
        batch_id = None if fault.forgets else self.batches.submit()
        if batch_id is not None:
            wait_for(lambda: self.batches.done(batch_id) >= 30, 60)  # the batch gets going
        scratch = None if fault.forgets else self._start_scratch()  # in flight at the fault
        pids = self._pids()
        began = time.monotonic()
        hit = fault.inject(self.fleet, rng)
        self.log.append(f"{fault.name}: {hit}")
        if any(not actor.alive for actor in self.fleet.actors.values()):
            time.sleep(fault.down_s)
            self.fleet.revive()
        if fault.forgets:  # what Redis alone held is gone: stopped engines' records
            self.expected = {e: s for e, s in self.expected.items() if s == "RUNNING"}
        found = self._until_whole()
        if batch_id is not None and fault.recovery_includes_batch and not found:
            found = self.batches.finished(batch_id)
        outcome = Outcome(fault.name, hit, time.monotonic() - began, {}, found)
        restarted = sorted(e for e, pid in pids.items() if self._pids().get(e) != pid)
        if len(restarted) > fault.restarts:  # adopted, not restarted: the same processes
            outcome.problems.append(f"restarted although not hit: {restarted}")
        if scratch is None:
            scratch = self._start_scratch()
        self.fleet.procs.cli("llm", "engine", "stop", scratch)
        self.expected[scratch] = "STOPPED"
        if batch_id is not None and not fault.recovery_includes_batch:
            outcome.problems += self.batches.finished(batch_id)
        outcome.problems += self._until_whole()
        outcome.problems += [f"dead-lettered: {d}" for d in dead_letters(self.fleet)]
        outcome.answers = dict(self.load.take())
        self.log.append(f"  answers {outcome.answers}")
        self.outcomes.append(outcome)
        return outcome

    def _pids(self) -> dict[str, int]:
        """The process of each engine that runs throughout (not the round's scratch engine)."""
        return {
            r["engine_id"]: r["pid"]
            for r in self.fleet.records()
            if r["state"] == "RUNNING" and not str(r["engine_id"]).startswith("scratch")
        }

    def _start_scratch(self) -> str:
        record = self.fleet.procs.json(*_start("scratch", "llm"))
        self.expected[record["engine_id"]] = "RUNNING"
        return str(record["engine_id"])

    def _until_whole(self) -> list[str]:
        began = time.monotonic()
        last: list[str] = []
        while found := problems(self.fleet, self.expected):
            if found != last:  # what recovery waits on, as it changes (tmp_path/chaos.log)
                self.log.append(f"  +{time.monotonic() - began:5.1f} s {found}")
                last = found
            if time.monotonic() > began + RECOVERY_DEADLINE_S:
                return found
            time.sleep(0.1)
        died = self.fleet.died_unasked()
        return [f"died without being killed: {died}"] if died else []


def _start(model: str, kind: str) -> list[str]:
    where = "--no-gpu" if kind == "embedding" else "--use-gpu"
    args = ["llm", "engine", "start", model, "--backend", "fake", "--engine-kind", kind, where]
    return [*args, "--extra-args", "--latency-ms 20 --child"]  # a worker, as vLLM's


def test_a_loaded_fleet_survives_each_fault_in_turn_then_a_seeded_random_mix(
    processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    plan = [*FAULTS, *(rng.choice(FAULTS) for _ in range(ROUNDS))]
    _survives(plan, rng, processes, tmp_path, capsys)


def test_primary_failovers_under_load_lose_nothing(
    processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sentinel promotes the replica, then (the old primary back as its replica) the other way:
    every acknowledged start and stop carried out, the batch exactly once, no engine restarted,
    no actor restarted by hand."""
    failover = next(f for f in FAULTS if f.name == "Redis primary failover")
    _survives([failover, failover], random.Random(SEED), processes, tmp_path, capsys)


def _survives(
    plan: list[Fault],
    rng: random.Random,
    processes: Processes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Runs the plan's faults in turn on a loaded chaos fleet; fails on the first round that
    leaves it less than whole."""
    fleet = ChaosFleet(processes, tmp_path)
    try:
        fleet.start()
        with Load(fleet.url) as load:
            rounds = Rounds(fleet, load)
            rounds.start_engines()
            for fault in plan:
                outcome = rounds.run(fault, rng)
                if outcome.problems:
                    break
            rounds.batches.client.close()
    finally:
        fleet.redis.kill()
    report = table(rounds.outcomes, len(plan))
    with capsys.disabled():
        print("\n" + report)
    (tmp_path / "chaos.json").write_text(json.dumps([o.__dict__ for o in rounds.outcomes]))
    (tmp_path / "chaos.log").write_text("\n".join(rounds.log) + "\n")
    broken = [o for o in rounds.outcomes if o.problems]
    assert not broken, f"{broken[0].fault} ({broken[0].hit}): {broken[0].problems}\n{report}"


def table(outcomes: list[Outcome], planned: int) -> str:
    """Faults injected, survived, recovery p50/p99 (to whole again), per fault and in all."""
    rows = [("fault", "injected", "survived", "recovery p50", "recovery p99", "requests ok/not")]
    names = list(dict.fromkeys(o.fault for o in outcomes))
    for name, mine in [(n, [o for o in outcomes if o.fault == n]) for n in names] + [
        ("all", outcomes)
    ]:
        times = sorted(o.recovery_s for o in mine)
        ok = sum(n for o in mine for k, n in o.answers.items() if k.endswith(" ok"))
        not_ok = sum(n for o in mine for k, n in o.answers.items() if not k.endswith(" ok"))
        rows.append(
            (
                name,
                str(len(mine)),
                str(sum(not o.problems for o in mine)),
                f"{statistics.median(times):.1f} s",
                f"{_p99(times):.1f} s",
                f"{ok}/{not_ok}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"chaos (seed {SEED}, {len(outcomes)} of {planned} faults run)\n" + "\n".join(lines)


def _p99(times: list[float]) -> float:
    return times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
