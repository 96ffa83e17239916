"""Which backends this node runs, and in which Python: ``--runtime BACKEND=PYTHON``.

vLLM pins its own torch and needs gigabytes; llama.cpp is built for the host: each lives in a
venv or image of its own, not in the agent's. A backend without ``--runtime`` runs in the
agent's own interpreter if its modules are there. What was found goes into the node record
(``runtimes``: backend -> version), and placement sends an engine only to a node that has its
backend.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sage_mq.engines import runtime_probe
from sage_mq.errors import ConfigError

log = logging.getLogger(__name__)

PYTHON_BACKENDS = {
    "vllm": ["vllm"],
    "llamacpp": ["llama_cpp", "sse_starlette", "pydantic_settings"],
    "embedding": ["sentence_transformers", "sage_mq"],
}
"""The modules each backend's server needs (llama.cpp's server extra brings the last two)."""
_PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Runtime:
    """A backend this node can run: the interpreter it runs in and the version found there."""

    python: str
    version: str


def parse_runtimes(given: Iterable[str]) -> dict[str, str]:
    """``--runtime`` values (``vllm=/opt/venvs/vllm/bin/python``), checked: backend -> python."""
    found: dict[str, str] = {}
    for item in given:
        backend, sep, python = item.partition("=")
        backend = backend.strip().lower()
        if not sep or not python.strip():
            raise ConfigError(f"--runtime {item!r}: expected BACKEND=PYTHON, e.g. vllm=PATH")
        if backend not in PYTHON_BACKENDS:
            raise ConfigError(
                f"--runtime {item!r}: {backend!r} is not a backend that runs in a Python "
                f"environment; choose one of {', '.join(PYTHON_BACKENDS)}"
            )
        found[backend] = os.path.expanduser(python.strip())
    return found


def detect(configured: Mapping[str, str]) -> dict[str, Runtime]:
    """The backends this node runs. A configured runtime that does not have its backend is an
    error (the operator meant it); the agent's own interpreter offers what it happens to have.
    ``fake`` always runs here (it is sage-mq's own); ``command`` is governed by
    ``--allow-command``, not here."""
    runtimes: dict[str, Runtime] = {}
    for python, backends in _by_interpreter(configured).items():
        versions = _probe(python, backends)
        for backend in backends:
            if backend in versions:
                runtimes[backend] = Runtime(python, versions[backend])
            elif backend in configured:
                modules = ", ".join(PYTHON_BACKENDS[backend])
                raise ConfigError(
                    f"--runtime {backend}={python}: {modules} not found in that environment "
                    f"(install the {backend} server there, or name another interpreter)"
                )
    from sage_mq import __version__

    runtimes["fake"] = Runtime(sys.executable, __version__)
    for backend, runtime in sorted(runtimes.items()):
        log.info("runtime %s %s: %s", backend, runtime.version, runtime.python)
    return runtimes


def _by_interpreter(configured: Mapping[str, str]) -> dict[str, list[str]]:
    """Which backends to look for in which interpreter (one probe each)."""
    wanted: dict[str, list[str]] = {}
    for backend in PYTHON_BACKENDS:
        python = configured.get(backend, sys.executable)
        wanted.setdefault(python, []).append(backend)
    return wanted


def _probe(python: str, backends: list[str]) -> dict[str, str]:
    """Run :mod:`sage_mq.engines.runtime_probe` in ``python``: backend -> version found."""
    wanted = json.dumps({b: PYTHON_BACKENDS[b] for b in backends})
    script = str(Path(runtime_probe.__file__))
    if python == sys.executable:
        return {
            b: v for b in backends if (v := runtime_probe.found(PYTHON_BACKENDS[b])) is not None
        }
    if not os.access(python, os.X_OK):
        raise ConfigError(f"--runtime: {python} is not an executable interpreter on this host")
    try:
        done = subprocess.run(
            [python, "-I", script, wanted],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=True,
        )
        versions: dict[str, str] = json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"--runtime: {python} did not answer in {_PROBE_TIMEOUT_S:.0f}s"
        ) from None
    except (subprocess.CalledProcessError, json.JSONDecodeError, OSError) as exc:
        detail = (getattr(exc, "stderr", "") or str(exc)).strip()[-300:]
        raise ConfigError(f"--runtime: cannot ask {python} what it has: {detail}") from None
    return versions
