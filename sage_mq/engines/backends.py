"""How each backend is started: argv, environment, health paths and startup time.

Pure functions of the launch command; the agent spawns what they return, never through a shell.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from sage_mq.engines.argv_policy import PLACEHOLDERS
from sage_mq.errors import InvalidRequest
from sage_mq.messages import LaunchEngine

BACKEND_NAMES = ("vllm", "embedding", "command", "fake")
_STARTUP_TIMEOUT_S = {"vllm": 1800.0, "embedding": 600.0, "command": 600.0, "fake": 60.0}


def default_backend(kind: str) -> str:
    """``vllm`` for LLM engines, ``embedding`` for embedding engines."""
    return "embedding" if kind == "embedding" else "vllm"


def device(cmd: LaunchEngine) -> str:
    """``cuda`` when the engine was given GPUs, else ``cpu``."""
    return "cuda" if cmd.use_gpu and cmd.gpus else "cpu"


_PERMANENT = {
    "vllm": {2: "its arguments were refused (vLLM exits 2 on a usage error)"},
    "embedding": {2: "sentence-transformers is missing, or its arguments were refused"},
    "fake": {2: "its arguments were refused"},
}
"""Exit codes each backend documents as permanent: another try would end the same way."""


def permanent_exit(backend: str, returncode: int | None) -> str | None:
    """Why an exit with ``returncode`` cannot be mended by a restart, or None if it may."""
    return _PERMANENT.get(backend, {}).get(returncode) if returncode is not None else None


def health_paths(kind: str) -> tuple[str, ...]:
    """Readiness/health endpoints: LLMs ``/health`` then ``/v1/models``; embeddings ``/health``."""
    return ("/health",) if kind == "embedding" else ("/health", "/v1/models")


def startup_timeout_s(backend: str) -> float:
    """How long an engine of this backend may take to become ready (vLLM loads for minutes)."""
    return _STARTUP_TIMEOUT_S.get(backend, 600.0)


def build_argv(
    cmd: LaunchEngine,
    python: str | None = None,
    executables: Mapping[str, str] | None = None,
) -> list[str]:
    """The argv list that starts the engine. For ``command``, the template's executable is
    replaced by its path from ``executables`` (what the node's operator allowed)."""
    py = python or sys.executable
    if cmd.backend == "command":
        return _command(cmd, executables or {})
    builders = {"vllm": _vllm, "embedding": _embedding, "fake": _fake}
    builder = builders.get(cmd.backend)
    if builder is None:
        raise InvalidRequest(f"unknown backend {cmd.backend!r}; choose one of {BACKEND_NAMES}")
    return builder(cmd, py)


def build_env(cmd: LaunchEngine, base: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: the base plus ``CUDA_VISIBLE_DEVICES`` (empty for CPU)."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cmd.gpus) if cmd.use_gpu else ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _vllm(cmd: LaunchEngine, py: str) -> list[str]:
    argv = [
        py,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        cmd.model,
        "--host",
        cmd.host,
        "--port",
        str(cmd.port),
        "--tensor-parallel-size",
        str(cmd.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(cmd.pipeline_parallel_size),
    ]
    if cmd.gpu_memory_utilization is not None and "--gpu-memory-utilization" not in cmd.extra_args:
        argv += ["--gpu-memory-utilization", f"{cmd.gpu_memory_utilization:.2f}"]
    return argv + list(cmd.extra_args)


def _embedding(cmd: LaunchEngine, py: str) -> list[str]:
    return [
        py,
        "-m",
        "sage_mq.engines.embedding_server",
        "--model",
        cmd.model,
        "--host",
        cmd.host,
        "--port",
        str(cmd.port),
        "--device",
        device(cmd),
        *cmd.extra_args,
    ]


def _fake(cmd: LaunchEngine, py: str) -> list[str]:
    return [
        py,
        "-m",
        "sage_mq.engines.fake_server",
        "--model",
        cmd.model,
        "--host",
        cmd.host,
        "--port",
        str(cmd.port),
        "--kind",
        cmd.kind,
        *cmd.extra_args,
    ]


def _command(cmd: LaunchEngine, executables: Mapping[str, str]) -> list[str]:
    if not cmd.extra_args:
        raise InvalidRequest("backend 'command' needs the server's argv template in extra_args")
    values = {
        "{model}": cmd.model,
        "{host}": cmd.host,
        "{port}": str(cmd.port),
        "{device}": device(cmd),
    }
    executable, *template = cmd.extra_args
    argv = [executables.get(executable, executable)]
    for arg in template:
        for placeholder in PLACEHOLDERS:
            arg = arg.replace(placeholder, values[placeholder])
        argv.append(arg)
    return argv


def gpu_memory_utilization(memory_gb_per_gpu: float, gpu_total_gb: float) -> float:
    """The fraction of a GPU vLLM may take: what was reserved, rounded up, within [0.05, 0.95]."""
    if gpu_total_gb <= 0:
        return 0.9
    fraction = math.ceil(memory_gb_per_gpu / gpu_total_gb * 100) / 100
    return min(0.95, max(0.05, fraction))
