"""What a request may put on an engine's command line: pure checks, no I/O.

A request chooses a model and an engine's tuning flags, never what a node runs or what code it
loads. So:

- every argument is text a process can receive (no NUL, valid UTF-8), and there are not too many;
- flags sage-mq sets itself (model, host, port, parallelism, the device) cannot be given again;
- the fake engine and our embedding server take only their own flags;
- vLLM and llama.cpp take their flags except those that load code, read or write files the
  request names, or change how the engine is reached; a node's operator may allow one of those
  on that node (``sage llm node run --allow-engine-flag --trust-remote-code``);
- the ``command`` backend runs only an executable the node's operator allowed
  (``sage llm node run --allow-command EXECUTABLE``).

The checks that hold on every node run where a request enters (:func:`check_engine_args`); the
ones that depend on a node's allowances run in placement and again on the node itself
(:func:`node_refusal`), which has the last word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sage_mq.errors import InvalidRequest

MAX_ARGS = 256
MAX_ARG_CHARS = 8192
MAX_MODEL_CHARS = 512
PLACEHOLDERS = ("{model}", "{host}", "{port}", "{device}", "{served_model_name}")

_OWN_FLAGS = {
    "fake": frozenset(
        {
            "--dim",
            "--startup-delay",
            "--crash-after",
            "--exit-code",
            "--hang-after",
            "--latency-ms",
            "--stream-delay-ms",
            "--child",
        }
    ),
    "embedding": frozenset({"--max-batch"}),
}
"""The flags our own engines take (tests hold these to their argument parsers)."""

_SET_BY_US = {
    "fake": frozenset({"--model", "--host", "--port", "--kind", "--served-model-name"}),
    "embedding": frozenset({"--model", "--host", "--port", "--device", "--served-model-name"}),
    "vllm": frozenset(
        {
            "--model",
            "--host",
            "--port",
            "--uds",
            "--headless",
            "--tensor-parallel-size",
            "--pipeline-parallel-size",
            "-tp",
            "-pp",
            "--served-model-name",
        }
    ),
    "llamacpp": frozenset(
        {
            "--model",
            "--host",
            "--port",
            "--model-alias",
            "--n-gpu-layers",
            "--embedding",
            "--interrupt-requests",
            "--api-key",
            "--root-path",
        }
    ),
}
"""Flags sage-mq gives each backend itself: a second value would break placement or probing."""

VLLM_GATED_FLAGS = frozenset(
    {
        # run code named by the request
        "--trust-remote-code",
        "--middleware",
        "--tool-parser-plugin",
        "--reasoning-parser-plugin",
        "--worker-cls",
        "--worker-extension-cls",
        "--scheduler-cls",
        "--logits-processors",
        "--kv-transfer-config",
        "--ec-transfer-config",
        "--compilation-config",
        "-cc",
        "--log-config-file",
        # read or write files the request names
        "--config",
        "--chat-template",
        "--allowed-local-media-path",
        "--download-dir",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
    }
)
"""vLLM flags a request may use only where the node's operator allowed them: each loads code
(an import path, a plugin file, remote model code, a logging config), reads or writes a path of
the request's choosing, or (TLS) changes how the engine is reached."""

LLAMACPP_GATED_FLAGS = frozenset(
    {
        "--config-file",  # a file of settings: any model, any path, any address
        "--lora-base",
        "--lora-path",
        "--clip-model-path",
        "--hf-tokenizer-config-path",
        "--hf-pretrained-model-name-or-path",  # fetches and loads a tokenizer's files
        "--hf-model-repo-id",  # downloads weights
        "--rpc-servers",  # sends the model's work to other hosts
        "--ssl-keyfile",
        "--ssl-certfile",
    }
)
"""llama.cpp (llama-cpp-python's server) flags gated the same way, by their normalized names
(the server spells them with underscores: ``--lora_path``)."""

GATED_FLAGS = {"vllm": VLLM_GATED_FLAGS, "llamacpp": LLAMACPP_GATED_FLAGS}

_VLLM_EXACT = frozenset({"--reasoning-parser"})
"""Real vLLM flags that happen to begin another one's name (so they are not abbreviations)."""

_NUMBER = re.compile(r"-\.?\d")
MODEL_PATTERN = r"^[^\x00-\x1f\x7f-][^\x00-\x1f\x7f]{0,511}$"
"""A model id or path as the REST API documents it (one argument: no control characters, not
a flag)."""
_MODEL = re.compile(MODEL_PATTERN)
ARG_PATTERN = r"^[^\x00]*$"


@dataclass(frozen=True)
class NodeAllowances:
    """What a node's operator lets requests run there, beyond the defaults."""

    commands: frozenset[str] = frozenset()
    """Executables for the ``command`` backend: the names the operator gave and their paths."""
    engine_flags: frozenset[str] = frozenset()
    """Gated engine flags (:data:`GATED_FLAGS`) allowed on the node."""
    backends: frozenset[str] | None = None
    """The backends it has a runtime for (``--runtime``); None: not said (an older agent)."""


def check_engine_args(backend: str, model: str, args: Sequence[str]) -> None:
    """Raise :class:`InvalidRequest` for a model name or arguments no node would run."""
    check_model(model)
    _check_text(args)
    if backend == "command":
        _check_template(args)
    elif backend in _OWN_FLAGS:
        _check_own_flags(backend, args)
    elif backend in GATED_FLAGS:
        _check_reserved(backend, args)


def check_model(model: str) -> None:
    """A model id or path is text for one argument (:data:`MODEL_PATTERN`): bounded, no
    control characters, not a flag."""
    if not model or len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"the model name must have 1 to {MAX_MODEL_CHARS} characters")
    if model.startswith("-"):
        raise InvalidRequest(f"the model name {model[:60]!r} begins with '-', like a flag")
    if not _MODEL.fullmatch(model) or not encodable(model):
        raise InvalidRequest("the model name holds control characters or unpaired surrogates")


def gated_flags(backend: str, args: Sequence[str]) -> list[str]:
    """The flags in ``args`` that a node must allow (gated flags, by their full names)."""
    gated = GATED_FLAGS.get(backend)
    if gated is None:
        return []
    found = (_match(name, gated) for name in _flag_names(args))
    return sorted({flag for flag in found if flag is not None})


def node_refusal(backend: str, args: Sequence[str], allowances: NodeAllowances) -> str | None:
    """Why a node with ``allowances`` will not run these arguments, or None if it will."""
    runs = allowances.backends
    if backend != "command" and runs is not None and backend not in runs:
        return (
            f"it has no {backend} runtime (it runs {', '.join(sorted(runs)) or 'none'}; its "
            f"operator adds one with `sage llm node run --runtime {backend}=PYTHON`)"
        )
    if backend == "command":
        executable = args[0] if args else ""
        if executable not in allowances.commands:
            return (
                f"command {executable!r} is not allowed (its operator allows it with "
                f"`sage llm node run --allow-command {executable or 'EXECUTABLE'}`)"
            )
        return None
    missing = [f for f in gated_flags(backend, args) if f not in allowances.engine_flags]
    if missing:
        allow = " ".join(f"--allow-engine-flag {f}" for f in missing)
        return (
            f"engine flag(s) {', '.join(missing)} are not allowed (they load code or touch "
            f"files of the request's choosing; its operator allows them with `sage llm node "
            f"run {allow}`)"
        )
    return None


def _check_text(args: Sequence[str]) -> None:
    if len(args) > MAX_ARGS:
        raise InvalidRequest(f"{len(args)} extra arguments; at most {MAX_ARGS} are taken")
    for position, arg in enumerate(args):
        if len(arg) > MAX_ARG_CHARS:
            raise InvalidRequest(
                f"extra argument {position} has {len(arg)} characters; at most {MAX_ARG_CHARS}"
            )
        if "\x00" in arg or not encodable(arg):
            raise InvalidRequest(
                f"extra argument {position} holds a NUL byte or an unpaired surrogate; "
                "a process cannot receive it"
            )


def _check_template(args: Sequence[str]) -> None:
    if not args:
        raise InvalidRequest(
            "backend 'command' needs the server's argv template in extra_args, e.g. "
            "--extra-args 'my-server --model {model} --host {host} --port {port}'"
        )
    executable = args[0]
    if not executable.strip() or executable.startswith("-"):
        raise InvalidRequest(
            f"backend 'command': the first extra argument is the executable; {executable!r} "
            "is not one"
        )
    if any(p in executable for p in PLACEHOLDERS):
        raise InvalidRequest("backend 'command': the executable cannot be a placeholder")


def _check_own_flags(backend: str, args: Sequence[str]) -> None:
    taken = _OWN_FLAGS[backend]
    for name in _flag_names(args):
        if name in _SET_BY_US[backend]:
            raise InvalidRequest(_set_by_us(backend, name))
        if name not in taken:
            raise InvalidRequest(
                f"backend {backend!r} takes no flag {name!r}; it takes {', '.join(sorted(taken))}"
            )


def _check_reserved(backend: str, args: Sequence[str]) -> None:
    for name in _flag_names(args):
        reserved = _match(name, _SET_BY_US[backend])
        if reserved is not None:
            raise InvalidRequest(_set_by_us(backend, reserved))


_WHY_SET = {
    "--interrupt-requests": "sage-mq sets it to false: on, each request that waits for the "
    "model would end the answer being streamed",
}


def _set_by_us(backend: str, flag: str) -> str:
    if flag in _WHY_SET:
        return f"{flag} cannot be given to backend {backend!r}: {_WHY_SET[flag]}"
    return (
        f"{flag} cannot be given to backend {backend!r}: sage-mq sets it (model, host and port "
        "come from the request and its placement, GPU use from use_gpu; use the "
        "tensor_parallel_size, port and served_model_name fields)"
    )


def _flag_names(args: Iterable[str]) -> Iterable[str]:
    """Each flag as a parser would read its name: ``--max_model_len=8`` is ``--max-model-len``,
    ``--compilation-config.level`` is ``--compilation-config``; a negative number is a value."""
    for arg in args:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0].split(".", 1)[0]
            yield name.replace("_", "-").lower()
        elif arg.startswith("-") and len(arg) > 1 and not _NUMBER.match(arg):
            yield arg.split("=", 1)[0]


def _match(name: str, flags: frozenset[str]) -> str | None:
    """The flag of ``flags`` that ``name`` stands for: itself; a prefix argparse would expand
    to it (``--trust-remote``); or, for one-dash flags, one with its value attached (``-tp2``)."""
    if name in flags:
        return name
    if name.startswith("--"):
        if name in _VLLM_EXACT:
            return None
        return next((f for f in sorted(flags) if f.startswith("--") and f.startswith(name)), None)
    short = (f for f in sorted(flags) if not f.startswith("--"))
    return next((f for f in short if name.startswith(f) or f.startswith(name)), None)


def encodable(text: str) -> bool:
    """Text a process can receive: no unpaired surrogate (valid JSON escapes can carry one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
