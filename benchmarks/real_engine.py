"""The control plane's cost against real work: vLLM's CPU build serving Gemma-3-270M, and
llama.cpp's server serving its GGUF, each in its own venv (``--runtime``), as operators run them.

Real processes on a private Redis: a scheduler, a node agent, ``sage llm gateway run`` and two
``sage llm worker run`` workers. Each figure is measured both ways in the same run:

(a) cold start: ``sage llm engine start … --wait`` until RUNNING, against the same argv and
    environment started by hand until its readiness path answers 200 (trials alternate);
(b) the gateway: C concurrent clients (default 8) sending chat requests of ``--max-tokens``
    tokens (default 16, greedy) straight to vLLM and through the gateway, in alternating blocks:
    throughput ratio and latency; then 100 requests one at a time each way, alternating: the
    latency the gateway adds (the engine's own jitter, tens of ms, bounds what this can see:
    ``gateway_overhead.py`` measures the gateway's own cost precisely, against a fake engine);
(c) batch: N requests (default 200) as one batch through the queue and the workers
    (``UnifiedInferenceClient.batch``, what the Batch API does) against an async client keeping
    the same number in flight straight to vLLM. A batch runs in chunks of 200 requests, each
    chunk on one worker with ``--concurrency C``: 200 requests are C in flight, as direct.

The engine is the bottleneck here by far (the load generator and sage-mq idle most of each
request), so ratios near 1 are the point: sage-mq should cost nothing a user can see.

    python benchmarks/real_engine.py [--requests 200] [--concurrency 8] [--max-tokens 16]
        [--trials 2] [--llama-trials 4] [--out benchmarks/results/real_engine.json]

Needs the engines ``python scripts/prepare_engines.py`` makes (run it first; seconds once cached).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import batch_throughput, gateway_overhead
from benchmarks._cli import finish, parser_for
from benchmarks._fleet import BENCH_MARK, Fleet
from benchmarks._redis import redis_server

ROOT = Path(__file__).resolve().parent.parent
VLLM_ARGS = "--enforce-eager --max-model-len 2048 --max-num-seqs 16"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def manifest_path() -> Path:
    cache = os.environ.get("SAGE_MQ_ENGINE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache/sage-mq/engines") / "manifest.json"


def prepared() -> dict[str, Any]:
    """The manifest of the engines ``scripts/prepare_engines.py`` made."""
    path = manifest_path()
    if not path.is_file():
        raise SystemExit(f"no prepared engines ({path}): run python scripts/prepare_engines.py")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def chat_body(model: str, max_tokens: int) -> Any:
    def body(i: int) -> dict[str, Any]:
        question = f"Question {i}: name a colour."
        return {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every answer is max_tokens long: the same work each way
        }

    return body


class Engines:
    """Starts an engine through sage-mq, or the same argv by hand, and times it to ready."""

    def __init__(self, fleet: Fleet, workdir: Path) -> None:
        self.fleet, self.workdir = fleet, workdir

    def through_sage(self, model: str, *args: str) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        record = self.fleet.cli(
            "engine", "start", model, *args, "--no-gpu", "--wait", "--timeout", "900", timeout=960
        )
        seconds = time.perf_counter() - started
        if record["state"] != "RUNNING":
            raise RuntimeError(f"{model} ended {record['state']}: {record.get('last_error')}")
        return seconds, record

    def by_hand(self, record: dict[str, Any], env: dict[str, str], ready: str) -> float:
        """The argv sage-mq ran, on the port it used, with the environment it gave; seconds
        until ``ready`` answers 200 (the engine is stopped after)."""
        argv = record["argv"]
        environ = {
            **os.environ,
            **env,
            "CUDA_VISIBLE_DEVICES": "",
            "VLLM_HOST_IP": "127.0.0.1",
            BENCH_MARK: str(self.workdir),
        }
        log = open(self.workdir / "by-hand.log", "ab")  # noqa: SIM115 - the child keeps it
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=environ, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            url = f"http://127.0.0.1:{record['port']}{ready}"
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: see by-hand.log")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        finally:
            _kill_tree(proc.pid)

    def stop(self, engine_id: str) -> None:
        self.fleet.cli("engine", "stop", engine_id, timeout=120)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = [parent, *parent.children(recursive=True)]
    for proc in family:
        proc.kill()
    psutil.wait_procs(family, timeout=30)


def cold_starts(
    engines: Engines, trials: int, model: str, args: list[str], env: dict[str, str], ready: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a) for one engine: started through sage-mq, then ``trials`` times stopped, started by
    hand and started through sage-mq again. Returns (figures, the record left running)."""
    env_args = [a for name, value in env.items() for a in ("--env", f"{name}={value}")]
    seconds, record = engines.through_sage(model, *args, *env_args)
    ours, floor = [seconds], []
    for _ in range(trials):
        engines.stop(record["engine_id"])
        floor.append(engines.by_hand(record, env, ready))
        seconds, record = engines.through_sage(model, *args, *env_args)
        ours.append(seconds)
    ours_median = statistics.median(ours)
    floor_median = statistics.median(floor) if floor else None  # --trials 0: ours only
    figures: dict[str, Any] = {
        "ours_s": [round(s, 2) for s in ours],
        "floor_s": [round(s, 2) for s in floor],
        "ours_median_s": round(ours_median, 2),
        "floor_median_s": None if floor_median is None else round(floor_median, 2),
        "ratio": None if floor_median is None else round(ours_median / floor_median, 3),
    }
    return figures, record


def main(
    n: int, concurrency: int, max_tokens: int, trials: int, llama_trials: int
) -> dict[str, Any]:
    manifest = prepared()
    runtimes, models = manifest["runtimes"], manifest["models"]
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(url, Path(tmp))
        try:
            low = fleet.start_scheduler_and_node(
                "--runtime", f"vllm={runtimes['vllm']}",
                "--runtime", f"llamacpp={runtimes['llamacpp']}",
            )  # fmt: skip
            gw_port = low + 50
            fleet.start(
                "gateway", "gateway", "run", "--port", str(gw_port), "--log-level", "WARNING"
            )
            engines = Engines(fleet, Path(tmp))
            llama_args = ["--backend", "llamacpp", "--served-model-name", "gemma-gguf",
                          "--extra-args", "--chat_format gemma --n_ctx 2048"]  # fmt: skip
            llama, llama_record = cold_starts(
                engines, llama_trials, models["chat_gguf"], llama_args, {}, "/v1/models"
            )
            engines.stop(llama_record["engine_id"])
            vllm_args = ["--backend", "vllm", "--served-model-name", "gemma",
                         "--extra-args", VLLM_ARGS]  # fmt: skip
            vllm, record = cold_starts(
                engines, trials, models["chat"], vllm_args, VLLM_ENV, "/health"
            )
            body = chat_body("gemma", max_tokens)
            direct = f"{record['url']}/v1/chat/completions"
            gateway = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            one = body(0)
            gateway_overhead._wait_until_served(gateway, one)
            procs = {"engine": psutil.Process(int(record["pid"]))}
            loaded = gateway_overhead.under_load(
                direct, gateway, n, concurrency, procs, blocks=4, body=one
            )
            single = gateway_overhead.one_at_a_time(direct, gateway, 100, body=one, warm_up=5)
            for name in ("w1", "w2"):  # a chunk (200 requests) is one worker's: C in flight
                fleet.start(name, "worker", "run", "--concurrency", str(concurrency))
            a = asyncio.run(batch_throughput.direct(direct, n, concurrency, body))
            b = batch_throughput.queued(url, fleet.env["SAGE_MQ_NAMESPACE"], n, body)
        finally:
            fleet.close()
    return {
        "benchmark": "real_engine",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": manifest["versions"],
        "models": {"vllm": "Gemma-3-270M (bf16)", "llamacpp": "Gemma-3-270M (Q4_K_M GGUF)"},
        "requests": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "cold_start": {"vllm": vllm, "llamacpp": llama},
        "under_load": loaded,
        "one_at_a_time": single,
        "batch": {
            "direct": a,
            "queued": b,
            "throughput_ratio": round(b["rps"] / a["rps"], 3),
        },
    }


def _print(r: dict[str, Any]) -> None:
    for name, c in r["cold_start"].items():
        print(
            f"(a) {name} cold start to RUNNING: sage-mq {c['ours_s']} s, by hand {c['floor_s']} s"
            f" (medians {c['ours_median_s']} vs {c['floor_median_s']}: ratio {c['ratio']})"
        )
    load, single = r["under_load"], r["one_at_a_time"]
    print(f"(b) {r['concurrency']} clients, {r['max_tokens']} tokens per answer, vLLM on CPU")
    for side in ("direct", "gateway"):
        s = load[side]
        print(f"  {side:8} {s['rps']:>8} req/s  p50 {s['p50']} ms  p99 {s['p99']} ms")
    print(
        f"  throughput ratio {load['throughput_ratio']}; one at a time the gateway adds "
        f"p50 {single['added_p50_ms']} ms, p99 {single['added_p99_ms']} ms "
        f"(direct p50 {single['direct']['p50']} ms)"
    )
    batch = r["batch"]
    print(
        f"(c) {r['requests']} requests: batch queue {batch['queued']['rps']} req/s vs direct "
        f"async client {batch['direct']['rps']} req/s: ratio {batch['throughput_ratio']}"
    )


if __name__ == "__main__":
    parser = parser_for(__doc__, "real_engine")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2, help="vLLM starts by hand")
    parser.add_argument("--llama-trials", type=int, default=4, help="llama.cpp starts by hand")
    args = parser.parse_args()
    finish(
        main(args.requests, args.concurrency, args.max_tokens, args.trials, args.llama_trials),
        args.out,
        _print,
    )
