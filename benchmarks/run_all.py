"""Every benchmark, one after another, then docs/results.md from what they wrote.

Each benchmark runs as its own process (as its README command does) and writes its JSON under
``benchmarks/results/``; the report puts each headline figure beside what it is measured against
(the floor measured in the same run, a peer's documented figure, or the issue's target), as a
ratio, with the machine, the date and the command.

    python benchmarks/run_all.py [--quick] [--out docs/results.md]

``--quick`` runs each with a small load, to check that the whole chain works (its figures are
not the ones to quote); ``--skip NAME`` leaves one out (``real_engine`` needs the engines
``scripts/prepare_engines.py`` makes). Each has 300 s (quick) or an hour to finish: one that
overruns is killed with everything it started and reported failed, and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._headlines import HEADLINES, Row

ROOT = Path(__file__).resolve().parent.parent
FULL: dict[str, list[str]] = {name: [] for name in HEADLINES}
QUICK: dict[str, list[str]] = {
    "bus_roundtrip": ["--n", "300"],
    "recovery": ["--trials", "2"],
    "failover": ["--n", "300", "--trials", "1"],
    "scale": ["--nodes", "50", "--engines", "200", "--steady", "3"],
    "gateway_overhead": ["--requests", "500"],
    "batch_throughput": ["--requests", "200"],
    "upstream_client": ["--requests", "600", "--blocks", "2"],
    "real_engine": [
        "--trials",
        "0",
        "--llama-trials",
        "0",
        "--requests",
        "16",
        "--max-tokens",
        "4",
    ],
}


RUN_MARK = "SAGE_BENCH_RUN"
"""In the environment of a benchmark and of every process it starts (servers, fleets, engines):
what a benchmark that overran its time left is found by."""
QUICK_TIMEOUT_S, FULL_TIMEOUT_S = 300, 3600


def run(name: str, args: list[str], results: Path, timeout_s: float) -> dict[str, Any]:
    """One benchmark as its own process; its JSON, with how it was run. One that overruns
    ``timeout_s`` is killed with all it started, and fails: the others still run."""
    out = results / f"{name}.json"
    command = ["python", f"benchmarks/{name}.py", *args]
    print(f"== {' '.join(command)}", flush=True)
    started = time.monotonic()
    mark = f"{os.getpid()}-{name}"
    argv = [sys.executable, f"benchmarks/{name}.py", *args, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, RUN_MARK: mark})
    try:
        failed = f"exit {proc.wait(timeout=timeout_s)}"
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout_s:.0f} s"
        print(f"== {name} {failed}: killed, with what it started", flush=True)
        _kill_all(proc.pid, mark)
        proc.wait()
    seconds = time.monotonic() - started
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    ran = {"name": name, "command": command, "seconds": seconds, "json": str(shown)}
    if proc.returncode != 0:
        return ran | {"failed": failed}
    return ran | {"figures": json.loads(out.read_text())}


def _kill_all(pid: int, mark: str) -> None:
    """The benchmark, what it started (a redis-server among them: it rewrites its environment,
    so only its parentage finds it) and whatever else carries its mark (engines in sessions
    of their own)."""
    found: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        found = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(RUN_MARK) == mark:
                found.append(proc)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def report(runs: list[dict[str, Any]], quick: bool) -> str:
    """docs/results.md."""
    lines = [
        "# Benchmarks",
        "",
        f"Every figure below is from one run of `python benchmarks/run_all.py"
        f"{' --quick' if quick else ''}`, {time.strftime('%Y-%m-%d')}, on {_machine()}.",
        "Each benchmark measures both sides in the same run on the same machine; *ratio* is ours"
        " divided by what the figure is measured against: the **floor** (the same work without"
        " sage-mq, measured in that run), an **anchor** (a peer's documented figure) or the"
        " **target** its issue set. Fake engines answer with no model (`backend=fake`), so what is"
        " measured is the control plane's own cost; `real_engine` puts that cost beside real work"
        " (vLLM's CPU build and llama.cpp serving Gemma-3-270M).",
        "",
    ]
    if quick:
        lines += ["**A `--quick` run: small loads, to check the chain; not figures to quote.**", ""]
    lines += [
        "| benchmark | figure | ours | against | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "failed" in r:
            lines.append(f"| {r['name']} | **failed** ({r['failed']}) | | | | | no |")
            continue
        for row in HEADLINES[r["name"]](r["figures"]):
            lines.append(_row(r["name"], row))
    lines += ["", "## How each was run", ""]
    for r in runs:
        took = f"{r['seconds']:.0f} s"
        lines.append(
            f"- `{' '.join(r['command'])}` ({took}): JSON in `{r['json']}`;"
            " what it measures and how is in the script's docstring and in"
            " [Benchmarks and chaos](benchmarks.md)."
        )
    return "\n".join(lines) + "\n"


def _row(name: str, row: Row) -> str:
    against = "—" if row.against is None else f"{_num(row.against)} {row.unit}"
    ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
    met = {True: "yes", False: "**no**", None: "—"}[row.met]
    return (
        f"| {name} | {row.figure} | {_num(row.ours)} {row.unit} | {against} ({row.against_is}) "
        f"| {ratio} | {row.target} | {met} |"
    )


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:  # Linux: the CPU's name
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "")
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.node()} ({os.cpu_count()} cores, {model or platform.machine()}, "
        f"{memory:.0f} GiB, Python {platform.python_version()}, {platform.system()})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small loads: check the chain")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--skip", action="append", default=[], choices=sorted(FULL), help="leave one out"
    )
    options = parser.parse_args()
    options.results.mkdir(parents=True, exist_ok=True)
    plan = QUICK if options.quick else FULL
    timeout_s = QUICK_TIMEOUT_S if options.quick else FULL_TIMEOUT_S
    runs = [
        run(name, args, options.results, timeout_s)
        for name, args in plan.items()
        if name not in options.skip
    ]
    options.out.write_text(report(runs, options.quick))
    print(f"wrote {options.out}")
    sys.exit(1 if any("failed" in r for r in runs) else 0)
