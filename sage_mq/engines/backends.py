"""How each backend is started: argv, environment, health paths and startup time.

Pure functions of the launch command; the agent spawns what they return, never through a shell.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import get_args

from sage_mq.engines.argv_policy import PLACEHOLDERS
from sage_mq.engines.env_policy import REACH
from sage_mq.errors import InvalidRequest
from sage_mq.fields import Backend
from sage_mq.messages import LaunchEngine

BACKEND_NAMES: tuple[str, ...] = get_args(Backend)
_STARTUP_TIMEOUT_S = {
    "vllm": 1800.0,
    "llamacpp": 600.0,
    "embedding": 600.0,
    "command": 600.0,
    "fake": 60.0,
}
MODULES = {
    "vllm": "vllm.entrypoints.openai.api_server",
    "llamacpp": "llama_cpp.server",
    "embedding": "sage_mq.engines.embedding_server",
    "fake": "sage_mq.engines.fake_server",
}
"""The module each Python backend runs as ``python -m``."""


def device(cmd: LaunchEngine) -> str:
    """``cuda`` when the engine was given GPUs, else ``cpu``."""
    return "cuda" if cmd.use_gpu and cmd.gpus else "cpu"


_PERMANENT = {
    "vllm": {2: "its arguments were refused (vLLM exits 2 on a usage error)"},
    "llamacpp": {2: "its arguments were refused (llama.cpp's server exits 2 on a usage error)"},
    "embedding": {2: "sentence-transformers is missing, or its arguments were refused"},
    "fake": {2: "its arguments were refused"},
}
"""Exit codes each backend documents as permanent: another try would end the same way."""


def permanent_exit(backend: str, returncode: int | None) -> str | None:
    """Why an exit with ``returncode`` cannot be mended by a restart, or None if it may."""
    return _PERMANENT.get(backend, {}).get(returncode) if returncode is not None else None


def health_paths(backend: str, kind: str) -> tuple[str, ...]:
    """Readiness/health endpoints, tried in order until one answers 200: LLMs ``/health`` then
    ``/v1/models``; embeddings ``/health``.

    llama.cpp's server has no ``/health``, and its ``/v1/models`` takes the model's lock: a probe
    there waits behind the generation in progress (a busy engine would fail its probes and be
    restarted). It loads its model before it listens, so an answer from FastAPI's ``/docs``
    page, which takes no lock, says as much, for its chat and embedding engines alike.
    """
    if backend == "llamacpp":
        return ("/health", "/docs")
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
    builders = {"vllm": _vllm, "llamacpp": _llamacpp, "embedding": _embedding, "fake": _fake}
    builder = builders.get(cmd.backend)
    if builder is None:
        raise InvalidRequest(f"unknown backend {cmd.backend!r}; choose one of {BACKEND_NAMES}")
    return builder(cmd, py)


def build_env(cmd: LaunchEngine, base: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: the base less what would change how the engine is reached
    (a ``PORT`` a container platform set would move llama.cpp's server), the request's own
    variables, ``CUDA_VISIBLE_DEVICES`` (empty for CPU), and for vLLM its address
    (``VLLM_HOST_IP``: found otherwise by routing a packet towards a public address)."""
    env = {name: value for name, value in base.items() if name.upper() not in REACH}
    env.update(cmd.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cmd.gpus) if cmd.use_gpu else ""
    env["PYTHONUNBUFFERED"] = "1"
    if cmd.backend == "vllm":
        env["VLLM_HOST_IP"] = cmd.host
    return env


def _server(cmd: LaunchEngine, py: str) -> list[str]:
    """``PY -m MODULE --model M --host H --port P``: how every Python backend begins."""
    return [py, "-m", MODULES[cmd.backend], "--model", cmd.model, "--host", cmd.host,
            "--port", str(cmd.port)]  # fmt: skip


def _vllm(cmd: LaunchEngine, py: str) -> list[str]:
    argv = [
        *_server(cmd, py),
        "--tensor-parallel-size",
        str(cmd.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(cmd.pipeline_parallel_size),
    ]
    if cmd.gpu_memory_utilization is not None and "--gpu-memory-utilization" not in cmd.extra_args:
        argv += ["--gpu-memory-utilization", f"{cmd.gpu_memory_utilization:.2f}"]
    return argv + _served(cmd) + list(cmd.extra_args)


def _llamacpp(cmd: LaunchEngine, py: str) -> list[str]:
    """llama-cpp-python's OpenAI server: every layer on the GPUs it was given, none without."""
    argv = [
        *_server(cmd, py),
        "--n_gpu_layers",
        "-1" if device(cmd) == "cuda" else "0",
        # Its default ends the answer being streamed, with [DONE], whenever another request
        # waits for the model (the gateway's next request, a probe): requests queue instead.
        "--interrupt_requests",
        "false",
    ]
    if cmd.kind == "embedding":
        argv += ["--embedding", "true"]
    if cmd.served_model_name:
        argv += ["--model_alias", cmd.served_model_name]
    return argv + list(cmd.extra_args)


def _served(cmd: LaunchEngine) -> list[str]:
    return ["--served-model-name", cmd.served_model_name] if cmd.served_model_name else []


def _embedding(cmd: LaunchEngine, py: str) -> list[str]:
    return [
        *_server(cmd, py),
        "--device",
        device(cmd),
        *_served(cmd),
        *cmd.extra_args,
    ]


def _fake(cmd: LaunchEngine, py: str) -> list[str]:
    return [
        *_server(cmd, py),
        "--kind",
        cmd.kind,
        *_served(cmd),
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
        "{served_model_name}": cmd.served_model_name or cmd.model,
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
