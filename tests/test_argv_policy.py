"""What a request may put on an engine's command line (pure policy, tables of cases)."""

from __future__ import annotations

import pytest

from sage_mq.engines import argv_policy, embedding_server, fake_server
from sage_mq.engines.argv_policy import (
    NodeAllowances,
    check_engine_args,
    gated_flags,
    node_refusal,
)
from sage_mq.errors import InvalidRequest


@pytest.mark.parametrize(
    ("backend", "args"),
    [
        ("fake", ["--latency-ms", "5", "--crash-after=2"]),
        ("fake", ["--exit-code", "-1"]),  # a negative number is a value, not a flag
        ("embedding", ["--max-batch", "64"]),
        ("vllm", ["--max-model-len", "4096", "--enforce-eager", "--dtype", "half"]),
        ("vllm", ["--max_num_seqs=8", "-O3", "--reasoning-parser", "deepseek_r1"]),
        ("vllm", ["--trust-remote-code"]),  # allowed to ask for: a node must allow it (below)
        ("command", ["llama-server", "--model", "{model}", "--port", "{port}"]),
    ],
)
def test_arguments_any_node_could_run_pass(backend: str, args: list[str]) -> None:
    check_engine_args(backend, "org/model-1B", args)


@pytest.mark.parametrize(
    ("backend", "args", "why"),
    [
        ("fake", ["--model", "other"], "sage-mq sets it"),
        ("fake", ["--kind=embedding"], "sage-mq sets it"),
        ("fake", ["--lat", "5"], "takes no flag '--lat'"),  # no abbreviations of our own flags
        ("fake", ["--no-such-flag"], "takes no flag"),
        ("embedding", ["--device", "cuda"], "sage-mq sets it"),
        ("vllm", ["--port", "22"], "--port cannot be given"),
        ("vllm", ["--host=0.0.0.0"], "--host cannot be given"),
        ("vllm", ["--tensor_parallel_size", "8"], "--tensor-parallel-size cannot"),
        ("vllm", ["-tp8"], "-tp cannot be given"),
        ("vllm", ["--uds", "/tmp/s"], "--uds cannot be given"),
        ("vllm", ["--hos", "x"], "--host cannot be given"),  # argparse would expand it
        ("vllm", ["ok\x00"], "NUL byte"),
        ("vllm", ["\ud800"], "unpaired surrogate"),
        ("vllm", ["--x"] * 257, "at most 256"),
        ("vllm", ["y" * 8193], "at most 8192"),
        ("command", [], "argv template"),
        ("command", ["-c", "id"], "is not one"),
        ("command", ["{model}", "x"], "cannot be a placeholder"),
        ("command", ["", "x"], "is not one"),
    ],
)
def test_arguments_no_node_would_run_are_refused_with_the_reason(
    backend: str, args: list[str], why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why.replace("[", r"\[")):
        check_engine_args(backend, "m", args)


@pytest.mark.parametrize(
    ("model", "why"),
    [("", "1 to 512"), ("x" * 513, "1 to 512"), ("--trust-remote-code", "like a flag"),
     ("a\x00b", "control characters"), ("a\nb", "control characters"),
     ("\udcff", "surrogates")],
)  # fmt: skip
def test_a_model_name_is_one_plain_argument(model: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_engine_args("vllm", model, [])


@pytest.mark.parametrize(
    ("args", "gated"),
    [
        (["--trust-remote-code"], ["--trust-remote-code"]),
        (["--trust-remote"], ["--trust-remote-code"]),  # an abbreviation argparse expands
        (["--trust_remote_code=True"], ["--trust-remote-code"]),
        (["--middleware", "evil.mod"], ["--middleware"]),
        (["--compilation-config.pass_config.x", "1"], ["--compilation-config"]),
        (["-cc", "{}"], ["-cc"]),
        (["--config", "more-args.yaml"], ["--config"]),
        (["--chat-template", "/etc/shadow"], ["--chat-template"]),
        (["--tool-parser-plugin", "/tmp/p.py", "--download-dir", "/etc"],
         ["--download-dir", "--tool-parser-plugin"]),
        (["--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes"], []),
        (["--chat-template-content-format", "openai"], []),
        (["--no-trust-remote-code"], []),
    ],
)  # fmt: skip
def test_vllm_flags_that_load_code_or_name_files_are_gated(
    args: list[str], gated: list[str]
) -> None:
    assert gated_flags("vllm", args) == gated
    assert gated_flags("fake", args) == []  # our own engines have no such flags


def test_a_node_runs_only_what_its_operator_allowed() -> None:
    plain = NodeAllowances()
    operator = NodeAllowances(
        commands=frozenset({"llama-server", "/usr/local/bin/llama-server"}),
        engine_flags=frozenset({"--trust-remote-code"}),
    )
    shell = ["/bin/sh", "-c", "touch /tmp/pwned"]
    refusal = node_refusal("command", shell, operator)
    assert refusal is not None and "--allow-command /bin/sh" in refusal
    assert node_refusal("command", ["llama-server", "--port", "{port}"], plain) is not None
    assert node_refusal("command", ["llama-server", "--port", "{port}"], operator) is None
    assert node_refusal("command", ["/usr/local/bin/llama-server"], operator) is None
    remote = ["--trust-remote-code", "--middleware", "m"]
    refusal = node_refusal("vllm", remote, operator)
    assert refusal is not None and "--allow-engine-flag --middleware" in refusal
    assert "--trust-remote-code" not in refusal  # that one this node allows
    assert node_refusal("vllm", ["--trust-remote-code"], operator) is None
    assert node_refusal("vllm", ["--max-model-len", "8"], plain) is None


@pytest.mark.parametrize(
    ("backend", "server"), [("fake", fake_server), ("embedding", embedding_server)]
)
def test_our_engines_flags_are_what_their_parsers_take(backend: str, server: object) -> None:
    parser = server.parser()  # type: ignore[attr-defined]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    taken = argv_policy._OWN_FLAGS[backend] | argv_policy._SET_BY_US[backend]
    assert flags - {"-h", "--help"} == taken


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--model", "/other.gguf"], "--model cannot be given"),
        (["--n_gpu_layers", "99"], "--n-gpu-layers cannot be given"),
        (["--model_alias=x"], "--model-alias cannot be given"),
        (["--embedding", "true"], "--embedding cannot be given"),
        (["--port", "1"], "--port cannot be given"),
        (["--api_key", "k"], "--api-key cannot be given"),
        (["--interrupt_requests", "true"], "--interrupt-requests cannot be given"),
    ],
)
def test_llamacpp_flags_sage_mq_sets_are_refused_in_either_spelling(
    args: list[str], why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_engine_args("llamacpp", "/m.gguf", args)


def test_llamacpp_flags_that_load_files_are_gated_by_their_normalized_names() -> None:
    check_engine_args("llamacpp", "/m.gguf", ["--n_ctx", "2048", "--chat_format", "gemma"])
    args = ["--lora_path", "/x.bin", "--config_file=/etc/c.json", "--n_ctx", "512"]
    assert gated_flags("llamacpp", args) == ["--config-file", "--lora-path"]
    refused = node_refusal("llamacpp", args, NodeAllowances())
    assert refused is not None and "--allow-engine-flag --config-file" in refused
    allowed = NodeAllowances(engine_flags=frozenset({"--config-file", "--lora-path"}))
    assert node_refusal("llamacpp", args, allowed) is None
