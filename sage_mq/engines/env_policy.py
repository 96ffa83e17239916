"""What a request may put in an engine's environment: pure checks, no I/O.

A request may hand an engine variables it reads (a token for gated weights, a vLLM tuning knob,
``OMP_NUM_THREADS``), never ones that choose what code the process loads, where it looks for
files, or how it is reached; nor ones sage-mq sets itself. The values are the request's secrets:
they go to the process and into the engine record in Redis, and nowhere else (the API, the CLI,
events and logs show the names only, see :func:`masked`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sage_mq.engines.argv_policy import LLAMACPP_GATED_FLAGS, encodable
from sage_mq.errors import InvalidRequest

MAX_VARIABLES = 64
MAX_VALUE_CHARS = 8192
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
HIDDEN = "***"

REACH = frozenset(
    {
        "VLLM_API_KEY",
        "VLLM_HOST_IP",
        # llama-cpp-python's server reads its settings from these when no flag gives them
        "HOST",
        "PORT",
        "API_KEY",
        "CONFIG_FILE",
        "ROOT_PATH",
        "SSL_KEYFILE",
        "SSL_CERTFILE",
    }
)
"""Variables that change how an engine is reached: never from a request, and not passed on
from the agent's own environment either (see :func:`sage_mq.engines.backends.build_env`)."""

_REFUSED_PREFIXES = {
    "LD_": "it makes the dynamic loader load code",
    "DYLD_": "it makes the dynamic loader load code",
    "PYTHON": "it changes what the Python interpreter loads",
    "GCONV": "it makes the C library load code",
    "OPENSSL_": "it makes OpenSSL load code",
    "SAGE_": "sage-mq sets its own variables",
    "XDG_": "it moves where configuration and caches are read from",
}
_REFUSED = {
    **dict.fromkeys(
        ("PATH", "BASH_ENV", "ENV", "NODE_OPTIONS", "PERL5OPT", "PERL5LIB", "RUBYOPT"),
        "it changes what code a process runs",
    ),
    **dict.fromkeys(
        ("VLLM_PLUGINS", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"),
        "it names code or compiled kernels to load",
    ),
    **dict.fromkeys(
        ("HOME", "HF_HOME", "HF_HUB_CACHE", "HF_MODULES_CACHE", "TRANSFORMERS_CACHE"),
        "it moves where models, code and configuration are read from",
    ),
    **dict.fromkeys(
        (
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES",
            "HIP_VISIBLE_DEVICES",
            "ROCR_VISIBLE_DEVICES",
        ),
        "sage-mq sets the devices an engine sees from its placement",
    ),
    # llama.cpp's server reads every setting it has no flag for from a variable of its name
    **{
        flag[2:].replace("-", "_").upper(): f"llama.cpp's server reads it as {flag}, a gated flag"
        for flag in LLAMACPP_GATED_FLAGS
    },
    # how the engine is reached: the agent's probes and the gateway must get through
    **dict.fromkeys(REACH, "it changes how the engine is reached"),
}


def check_engine_env(env: Mapping[str, str]) -> None:
    """Raise :class:`InvalidRequest` for an environment no engine may be given."""
    if len(env) > MAX_VARIABLES:
        raise InvalidRequest(f"{len(env)} environment variables; at most {MAX_VARIABLES}")
    for name, value in env.items():
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"environment variable name {name[:60]!r} is not one (letters, digits and _, "
                "not starting with a digit, at most 128)"
            )
        why = refusal(name)
        if why is not None:
            raise InvalidRequest(f"environment variable {name} cannot be given to an engine: {why}")
        if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
            raise InvalidRequest(
                f"environment variable {name}: the value must be text of at most "
                f"{MAX_VALUE_CHARS} characters"
            )
        if "\x00" in value or not encodable(value):
            raise InvalidRequest(
                f"environment variable {name}: the value holds a NUL byte or an unpaired "
                "surrogate; a process cannot receive it"
            )


def refusal(name: str) -> str | None:
    """Why no request may set ``name`` (compared as upper case), or None if one may."""
    upper = name.upper()
    if upper in _REFUSED:
        return _REFUSED[upper]
    for prefix, why in _REFUSED_PREFIXES.items():
        if upper.startswith(prefix):
            return why
    return None


def masked(env: Mapping[str, str]) -> dict[str, str]:
    """The names with their values hidden: what anything but the engine process gets to see."""
    return dict.fromkeys(sorted(env), HIDDEN)
