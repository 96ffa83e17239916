"""Which engine modules a Python environment has, and their versions: run by path, with only
the standard library, in the interpreter an operator named (``--runtime vllm=PYTHON``), which
need not have sage-mq installed.

    python -I runtime_probe.py '{"vllm": ["vllm"]}'   ->   {"vllm": "0.32.0"}

A backend is listed when every module it needs is found; nothing is imported (importing vLLM
takes seconds and loads torch), so an environment whose packages are broken is caught when the
engine starts, by its exit and its log.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys


def found(modules: list[str]) -> str | None:
    """The version of the distribution that ships ``modules[0]``, if every module is there."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return None
        except (ImportError, ValueError):
            return None
    for dist in importlib.metadata.packages_distributions().get(modules[0], []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def main(argv: list[str]) -> None:
    wanted: dict[str, list[str]] = json.loads(argv[1])
    result = {backend: found(modules) for backend, modules in wanted.items()}
    print(json.dumps({k: v for k, v in result.items() if v is not None}))


if __name__ == "__main__":
    main(sys.argv)
