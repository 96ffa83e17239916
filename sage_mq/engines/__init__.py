"""Engine backends (argv and env for vllm, embedding, command, fake) and our own servers."""

from sage_mq.engines.backends import (
    BACKEND_NAMES,
    build_argv,
    build_env,
    default_backend,
    health_paths,
    startup_timeout_s,
)

__all__ = [
    "BACKEND_NAMES",
    "build_argv",
    "build_env",
    "default_backend",
    "health_paths",
    "startup_timeout_s",
]
