"""The scheduler at fleet scale: 1,000 simulated nodes x 8 fake GPUs, placing 5,000 engines.

The scheduler is the real one, a ``sage llm scheduler run`` process with 1 s health ticks.
The nodes are simulated agents in this process (benchmarks/_simfleet.py): they register,
heartbeat every second, answer every command and report health every tick, as real agents whose
engines always start and stay healthy. Measured:

- placement latency: start request published → the scheduler publishes its launch command to
  the chosen node (target p99 ≤ 10 ms), requests sent open-loop at ``--rate`` per second (from
  a process of its own, so the simulated agents' work never bunches them up); also
  shown: until the simulated agent has read it (adds this process's own delays);
- event lag: age of the oldest event the scheduler has not yet handled (undelivered or
  pending), sampled every 100 ms (target < 1 s);
- scheduler CPU, as a share of one core, while placing and in the steady state that follows
  (target ≤ 50 %);
- Redis memory per node (records, liveness keys, reservations, ports, streams).

    python benchmarks/scale.py [--nodes 1000] [--engines 5000] [--rate 100] [--steady 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._redis import percentile, redis_server
from benchmarks._simfleet import SimulatedFleet
from sage_mq.bus import Bus
from sage_mq.connection import raise_if_cancelled
from sage_mq.keys import Keys
from sage_mq.messages import StartEngine

NAMESPACE = "scale"
GROUP = "scheduler"


def start_scheduler(
    url: str, workdir: Path, tick_s: float, profile: Path | None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SAGE_MQ_REDIS_URL": url, "SAGE_MQ_NAMESPACE": NAMESPACE}
    log = open(workdir / "scheduler.log", "ab")  # noqa: SIM115 - the child keeps it
    argv = [sys.executable, "-m", "sage_mq", "llm", "scheduler", "run", "--name", "bench"]
    if profile is not None:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
    argv += ["--health-interval", str(tick_s), "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def demand(i: int) -> dict[str, Any]:
    """Four in five engines want one GPU, one in five two (tensor parallel); 60 GiB each."""
    tp = 2 if i % 5 == 4 else 1
    return {"tensor_parallel_size": tp, "required_memory_gb": 60.0 * tp, "use_gpu": True}


def send_requests(url: str, engines: int, rate: float, delay_s: float, out: Path) -> None:
    """The load generator, in a process of its own (the simulated agents' work would delay
    it into bursts): after ``delay_s``, ``engines`` start requests open-loop at ``rate`` per
    second; writes when each was sent."""

    async def main() -> dict[str, float]:
        redis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        bus = Bus(redis, Keys(NAMESPACE))
        sent_at: dict[str, float] = {}
        await asyncio.sleep(delay_s)
        t0 = time.monotonic()
        for i in range(engines):
            engine_id = f"e{i:05d}"
            request = StartEngine(engine_id=engine_id, model="bench-7b", **demand(i))
            sent_at[engine_id] = time.time()
            await bus.publish(bus.keys.requests, request)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
        await redis.aclose()
        return sent_at

    out.write_text(json.dumps(asyncio.run(main())))


async def oldest_unhandled_age(redis: Any, stream: str) -> float:
    """Seconds since the oldest entry of ``stream`` the scheduler group has not yet acked."""
    groups = await redis.xinfo_groups(stream)
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is None:
        return 0.0
    oldest: list[str] = []
    pending = await redis.xpending(stream, GROUP)
    if pending["pending"]:
        oldest.append(pending["min"])
    undelivered = await redis.xrange(stream, f"({group['last-delivered-id']}", "+", count=1)
    if undelivered:
        oldest.append(undelivered[0][0])
    if not oldest:
        return 0.0
    first_ms = min(int(entry_id.split("-")[0]) for entry_id in oldest)
    return max(0.0, time.time() - first_ms / 1000)


async def sample_lag(redis: Any, keys: Keys, into: list[float]) -> None:
    while True:
        ages = [await oldest_unhandled_age(redis, s) for s in (keys.events, keys.requests)]
        into.append(max(ages))
        raise_if_cancelled()  # redis-py can drop a cancellation: see its docstring
        await asyncio.sleep(0.1)


async def wait_running(redis: Any, keys: Keys, engines: int, timeout_s: float) -> int:
    """Wait until every engine record is RUNNING; how many are."""
    deadline = time.monotonic() + timeout_s
    running = 0
    while time.monotonic() < deadline:
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(engines):
                pipe.hget(keys.engine(f"e{i:05d}"), "state")
            states = await pipe.execute()
        running = sum(1 for s in states if s == "RUNNING")
        if running == engines:
            break
        await asyncio.sleep(0.5)
    return running


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


class CpuMeter:
    """CPU time of the scheduler, Redis and this process (the simulated agents), per phase."""

    def __init__(self, scheduler: psutil.Process, redis_port: int) -> None:
        redis_proc = next(
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "redis-server" and str(redis_port) in " ".join(p.info["cmdline"])
        )
        self.procs = {"scheduler": scheduler, "redis": redis_proc, "agents": psutil.Process()}
        self.start()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: cpu_seconds(p) for name, p in self.procs.items()}

    def shares(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        return {
            name: round((cpu_seconds(p) - self._cpu0[name]) / wall, 3)
            for name, p in self.procs.items()
        }


async def memory_breakdown(redis: Any) -> dict[str, int]:
    """Bytes by kind of key (MEMORY USAGE over every key of the namespace)."""
    kinds: dict[str, int] = {}
    async for key in redis.scan_iter(match=f"{NAMESPACE}:*", count=1000):
        size = await redis.memory_usage(key, samples=0) or 0
        parts = key.split(":")
        kind = "engine records" if parts[1] == "engine" else ":".join(parts[1:2])
        if parts[1] == "node" and len(parts) > 3:
            kind = f"node {parts[3]}"
        elif parts[1] == "node":
            kind = "node records"
        kinds[kind] = kinds.get(kind, 0) + int(size)
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


async def measure(url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    # A read that hangs (a reply lost) must raise, not stall the run: 10 s is far above any
    # reply here. The heartbeats get a client of their own.
    redis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    beats = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    keys = Keys(NAMESPACE)
    base_memory = (await redis.info("memory"))["used_memory"]
    fleet = SimulatedFleet(redis, NAMESPACE, args.nodes, f"{args.gpus}x80GiB", beat_redis=beats)
    await fleet.register()
    nodes_memory = (await redis.info("memory"))["used_memory"] - base_memory
    tasks = [
        asyncio.create_task(fleet.heartbeats()),
        asyncio.create_task(fleet.answer_commands()),
    ]
    scheduler = start_scheduler(url, workdir, args.tick, args.profile)
    sent_file = workdir / "sent.json"
    sender = multiprocessing.get_context("spawn").Process(
        target=send_requests, args=(url, args.engines, args.rate, 3.0, sent_file)
    )  # 3 s: the scheduler elected, its first ticks out
    sender.start()
    os.nice(args.agents_nice)  # the agents stand in for other hosts: they yield the CPU here
    lag: list[float] = []
    try:
        proc = psutil.Process(scheduler.pid)
        await asyncio.sleep(3)
        tasks.append(asyncio.create_task(sample_lag(redis, keys, lag)))
        meter = CpuMeter(proc, int(url.rsplit(":", 1)[1].split("/")[0]))
        await asyncio.to_thread(sender.join)
        if sender.exitcode != 0:
            raise RuntimeError(f"the load generator failed (exit {sender.exitcode})")
        sent_at: dict[str, float] = json.loads(sent_file.read_text())
        running = await wait_running(redis, keys, args.engines, timeout_s=120)
        for task in tasks:
            if task.done():
                task.result()  # a simulator that died: say why
        placing_cpu = meter.shares()
        placing_lag = list(lag)
        meter.start()
        await asyncio.sleep(args.steady)
        steady_cpu = meter.shares()
        steady_lag = lag[len(placing_lag) :]
        latencies = [
            (fleet.launch_sent_at[e] - sent_at[e]) * 1000
            for e in sent_at
            if e in fleet.launch_sent_at
        ]
        to_node = [
            (fleet.launched_at[e] - sent_at[e]) * 1000 for e in sent_at if e in fleet.launched_at
        ]
        if args.trace is not None:
            rows = [
                {"engine": e, "sent": t, "latency_ms": (fleet.launch_sent_at[e] - t) * 1000}
                for e, t in sent_at.items()
                if e in fleet.launch_sent_at
            ]
            trace = {"requests": rows, "ticks_read_at": fleet.ticks_read_at}
            args.trace.write_text(json.dumps(trace))
        total_memory = (await redis.info("memory"))["used_memory"] - base_memory
        kinds: dict[str, int] = {}
        for _entry_id, fields in await redis.xrange(keys.events):
            kinds[fields.get("type", "?")] = kinds.get(fields.get("type", "?"), 0) + 1
        breakdown = await memory_breakdown(redis)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        scheduler.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            scheduler.wait(10)
        scheduler.kill()
        await redis.aclose()
        await beats.aclose()
    return {
        "benchmark": "scale",
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "nodes": args.nodes,
        "gpus_per_node": args.gpus,
        "engines": args.engines,
        "running": running,
        "placed": len(latencies),
        "request_rate_per_s": args.rate,
        "health_interval_s": args.tick,
        "placement_latency_ms": stats(latencies),
        "request_to_node_read_ms": stats(to_node),
        "event_lag_s": {"placing": stats(placing_lag), "steady": stats(steady_lag)},
        "scheduler_cpu_share_of_a_core": {
            "placing": placing_cpu["scheduler"],
            "steady": steady_cpu["scheduler"],
        },
        "cpu_share_of_a_core_by_process": {"placing": placing_cpu, "steady": steady_cpu},
        "health_reports_answered": fleet.health_reports,
        "events_kept_by_type": kinds,
        "redis_bytes_per_node": {
            "registered_only": round(nodes_memory / args.nodes),
            "with_engines_and_streams": round(total_memory / args.nodes),
        },
        "redis_bytes_by_kind": breakdown,
        "targets": {
            "placement_latency_ms_p99": 10,
            "event_lag_s": 1,
            "scheduler_cpu_share_of_a_core": 0.5,
        },
    }


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    return {
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def _print(r: dict[str, Any]) -> None:
    lat, lag, cpu = r["placement_latency_ms"], r["event_lag_s"], r["scheduler_cpu_share_of_a_core"]
    print(
        f"{r['nodes']} nodes x {r['gpus_per_node']} GPUs, {r['engines']} engines at "
        f"{r['request_rate_per_s']}/s, {r['health_interval_s']} s ticks: {r['running']} RUNNING"
    )
    print(f"{'':34}{'p50':>9}{'p99':>9}{'max':>9}   target")
    print(f"{'placement latency (ms)':34}{lat['p50']:>9}{lat['p99']:>9}{lat['max']:>9}   p99 ≤ 10")
    read = r["request_to_node_read_ms"]
    print(f"{'  … until the node read it (ms)':34}{read['p50']:>9}{read['p99']:>9}{read['max']:>9}")
    for phase in ("placing", "steady"):
        s = lag[phase]
        print(f"{'event lag, ' + phase + ' (s)':34}{s['p50']:>9}{s['p99']:>9}{s['max']:>9}   < 1")
    print(
        f"scheduler CPU: {cpu['placing']:.0%} of a core placing, {cpu['steady']:.0%} steady"
        "   (target ≤ 50 %)"
    )
    for phase, shares in r["cpu_share_of_a_core_by_process"].items():
        print(f"  {phase}: " + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))
    mem = r["redis_bytes_per_node"]
    print(
        f"Redis per node: {mem['registered_only'] / 1024:.1f} KiB registered, "
        f"{mem['with_engines_and_streams'] / 1024:.1f} KiB with engines and streams"
    )
    for kind, size in list(r["redis_bytes_by_kind"].items())[:6]:
        print(f"  {kind:30}{size / 1024 / 1024:8.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--engines", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="start requests per second")
    parser.add_argument("--tick", type=float, default=1.0, help="health interval (s)")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds measured after")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("--profile", type=Path, help="write the scheduler's cProfile here")
    parser.add_argument(
        "--trace", type=Path, help="write each request's send time and latency, and the ticks"
    )
    parser.add_argument(
        "--agents-nice", type=int, default=10, help="niceness of the simulated agents' process"
    )
    args = parser.parse_args()
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(measure(url, args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    _print(figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
