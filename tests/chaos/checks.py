"""What must hold after every fault, read from the processes, Redis and the gateway.

:func:`problems` lists what does not hold yet (empty: the fleet is whole again). It is polled
after a fault until it is empty; what it still says at the deadline is what the fault broke.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import psutil

from sage_mq.agent.processes import ENGINE_MARK
from tests.chaos.harness import NODES, WORKERS_PER_ENGINE, ChaosFleet
from tests.helpers.engines import engine_processes

SETTLED = {"RUNNING", "FAILED", "STOPPED"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "still whole?"}]}


def problems(fleet: ChaosFleet, expected: dict[str, str]) -> list[str]:
    """Every way the fleet is not whole: ``expected`` maps engine ids to the state they must
    be in (RUNNING, or STOPPED once stopped); any other engine must be RUNNING or FAILED."""
    found: list[str] = []
    dead = [a.name for a in fleet.actors.values() if not a.alive]
    if dead:
        return [f"actors not running: {dead}"]
    records = {r["engine_id"]: r for r in fleet.records()}
    found += _states(records, expected)
    found += _processes(fleet, records)
    found += _reservations(fleet, records)
    if not found:
        found += _answers(fleet)
    return found


def _states(records: dict[str, dict[str, Any]], expected: dict[str, str]) -> list[str]:
    found = []
    for engine_id, want in expected.items():
        state = records.get(engine_id, {}).get("state")
        if state != want:
            found.append(f"{engine_id} is {state}, not {want}")
    for engine_id, record in records.items():
        if record["state"] not in SETTLED:
            found.append(f"{engine_id} is {record['state']}")
        elif record["state"] == "FAILED" and not record["last_error"]:
            found.append(f"{engine_id} FAILED with no reason")
    return found


def _processes(fleet: ChaosFleet, records: dict[str, dict[str, Any]]) -> list[str]:
    """Each RUNNING engine is its process (the one its record names) and the worker it
    forked, and nothing else runs: no duplicate, no stale or hung copy, and nothing left of a
    dead engine (a worker that outlived its engine still carries that engine's mark)."""
    running = {
        f"{r['node']}/{r['engine_id']}/{r['generation']}": r["pid"]
        for r in records.values()
        if r["state"] == "RUNNING"
    }
    procs = engine_processes(fleet.procs.state)
    by_mark: dict[str, list[int]] = {}
    for proc in procs:
        by_mark.setdefault(_mark(proc), []).append(proc.pid)
    found = []
    left = sorted(pid for mark, pids in by_mark.items() if mark not in running for pid in pids)
    if left:
        found.append(f"engine processes of no RUNNING engine left: {left}")
    for mark, pid in running.items():
        pids = by_mark.get(mark, [])
        if pid not in pids or len(pids) != WORKERS_PER_ENGINE + 1:
            found.append(f"{mark}: processes {sorted(pids)}, want pid {pid} and its worker")
    stopped = [p.pid for p in procs if _stopped(p)]
    if stopped:
        found.append(f"engine processes stopped (SIGSTOP) still there: {stopped}")
    return found


def _mark(proc: psutil.Process) -> str:
    try:
        return str(proc.environ().get(ENGINE_MARK, "?"))
    except psutil.Error:
        return "?"


def _stopped(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_STOPPED)
    except psutil.NoSuchProcess:
        return False


def _reservations(fleet: ChaosFleet, records: dict[str, dict[str, Any]]) -> list[str]:
    """Ports and GPU reservations held by exactly the engines that run there."""
    found = []
    with fleet.client() as client:
        for node in NODES:
            live = [r for r in records.values() if r["node"] == node and r["state"] == "RUNNING"]
            ports = client.hgetall(fleet.keys.node_ports(node))
            want_ports = {str(r["port"]): r["engine_id"] for r in live}
            if ports != want_ports:
                found.append(f"{node} ports {ports}, should be {want_ports}")
            held = {e: json.loads(v)["gpus"] for e, v in client.hgetall(
                fleet.keys.node_reservations(node)).items()}  # fmt: skip
            want_held = {r["engine_id"]: r["gpus"] for r in live if r["gpus"]}
            if held != want_held:
                found.append(f"{node} GPU reservations {held}, should be {want_held}")
    return found


def _answers(fleet: ChaosFleet) -> list[str]:
    """The gateway answers chat and embeddings."""
    asks = [("chat/completions", CHAT), ("embeddings", {"model": "mini", "input": ["a", "b"]})]
    found = []
    for route, body in asks:
        try:
            reply = httpx.post(f"{fleet.url}/v1/{route}", json=body, timeout=5)
        except httpx.TransportError as exc:
            found.append(f"/v1/{route}: {exc!r}")
            continue
        if reply.status_code != 200:
            found.append(f"/v1/{route}: {reply.status_code} {reply.text[:200]}")
    return found


def dead_letters(fleet: ChaosFleet) -> list[dict[str, str]]:
    """What went to the dead-letter stream (nothing should)."""
    with fleet.client() as client:
        return [fields for _id, fields in client.xrange(fleet.keys.dead)]


def batch_problems(batch: Any, lines: list[dict[str, Any]], custom_ids: list[str]) -> list[str]:
    """A finished batch: every request has exactly one result line, and none failed."""
    found = []
    if batch.status != "completed":
        found.append(f"batch {batch.id} is {batch.status}")
    counts = Counter(line["custom_id"] for line in lines)
    lost = sorted(set(custom_ids) - set(counts))
    twice = sorted(c for c, n in counts.items() if n > 1)
    if lost or twice:
        found.append(f"batch {batch.id}: {len(lost)} results lost, {len(twice)} duplicated")
    failed = [line for line in lines if line.get("error") or line["response"]["status_code"] != 200]
    if failed:
        found.append(f"batch {batch.id}: {len(failed)} failed, e.g. {failed[0]}")
    return found
