"""Runtimes: which backends a node runs, in which interpreter, found by asking it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_mq import __version__
from sage_mq.agent.runtimes import detect, parse_runtimes
from sage_mq.engines.argv_policy import NodeAllowances, node_refusal
from sage_mq.errors import ConfigError
from sage_mq.settings import runtimes_from_env
from tests.helpers.runtimes import venv_with


def test_runtime_options_are_checked() -> None:
    assert parse_runtimes(["vllm=~/v/bin/python", "LlamaCpp=/l/bin/python"]) == {
        "vllm": str(Path.home() / "v/bin/python"),
        "llamacpp": "/l/bin/python",
    }
    with pytest.raises(ConfigError, match="expected BACKEND=PYTHON"):
        parse_runtimes(["vllm"])
    with pytest.raises(ConfigError, match="'fake' is not a backend that runs in a Python"):
        parse_runtimes(["fake=/usr/bin/python3"])
    env = {"SAGE_MQ_RUNTIME_VLLM": "/v/bin/python", "SAGE_MQ_RUNTIME_LLAMACPP": "", "X": "1"}
    assert runtimes_from_env(env) == ["vllm=/v/bin/python"]


def test_a_named_interpreter_is_asked_what_it_has_with_versions(tmp_path: Path) -> None:
    python = venv_with(tmp_path, ("vllm", "0.32.0"), ("llama_cpp", "0.3.36"))
    found = detect({"vllm": python})
    assert found["vllm"].python == python and found["vllm"].version == "0.32.0"
    assert found["fake"].version == __version__  # always here: sage-mq's own
    # llama.cpp's server needs more than llama_cpp: not offered from a partial environment
    with pytest.raises(ConfigError, match="sse_starlette, pydantic_settings not found"):
        detect({"llamacpp": python})


def test_an_interpreter_that_is_not_one_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an executable interpreter"):
        detect({"vllm": str(tmp_path / "nope" / "python")})
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(ConfigError, match=r"cannot ask .* what it has: boom"):
        detect({"vllm": str(broken)})
    empty = venv_with(tmp_path)
    with pytest.raises(ConfigError, match=r"--runtime vllm=.*: vllm not found in that environment"):
        detect({"vllm": empty})


def test_placement_refuses_a_node_without_the_backends_runtime() -> None:
    node = NodeAllowances(backends=frozenset({"fake", "embedding"}))
    why = node_refusal("vllm", [], node)
    assert why is not None and "no vllm runtime" in why and "--runtime vllm=PYTHON" in why
    assert node_refusal("embedding", [], node) is None
    assert node_refusal("vllm", [], NodeAllowances()) is None  # an older agent: not said
