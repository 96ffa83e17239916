"""What a request may put in an engine's environment, and that the values stay hidden."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sage_mq.engines.env_policy import MAX_VARIABLES, check_engine_env, masked
from sage_mq.errors import InvalidRequest
from sage_mq.messages import StartEngine
from sage_mq.store import EngineRecord


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HF_TOKEN": "hf_secret", "OMP_NUM_THREADS": "2"},
        {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "DEBUG", "_PRIVATE": ""},
        {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    ],
)
def test_variables_an_engine_reads_pass(env: dict[str, str]) -> None:
    check_engine_env(env)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("LD_PRELOAD", "dynamic loader"),
        ("ld_library_path", "dynamic loader"),
        ("PYTHONPATH", "Python interpreter"),
        ("PYTHONSTARTUP", "Python interpreter"),
        ("PATH", "what code a process runs"),
        ("BASH_ENV", "what code a process runs"),
        ("VLLM_PLUGINS", "code or compiled kernels"),
        ("HF_HOME", "where models"),
        ("HOME", "where models"),
        ("CUDA_VISIBLE_DEVICES", "from its placement"),
        ("SAGE_ENGINE", "sage-mq sets its own"),
        ("SAGE_MQ_REDIS_URL", "sage-mq sets its own"),
        ("VLLM_HOST_IP", "how the engine is reached"),
        ("VLLM_API_KEY", "how the engine is reached"),
        ("PORT", "how the engine is reached"),
        ("CONFIG_FILE", "how the engine is reached"),
        ("LORA_PATH", "llama.cpp's server reads it as --lora-path"),
        ("HF_MODEL_REPO_ID", "--hf-model-repo-id"),
        ("rpc_servers", "--rpc-servers"),
    ],
)
def test_variables_that_load_code_move_files_or_change_reach_are_refused(
    name: str, why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_engine_env({name: "x"})


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"1ABC": "x"}, "is not one"),
        ({"A-B": "x"}, "is not one"),
        ({"": "x"}, "is not one"),
        ({"A": "x" * 8193}, "at most 8192"),
        ({"A": "a\x00b"}, "NUL"),
        ({"A": "\ud800"}, "surrogate"),
        ({f"V{i}": "x" for i in range(MAX_VARIABLES + 1)}, f"at most {MAX_VARIABLES}"),
    ],
)
def test_malformed_environments_are_refused(env: dict[str, str], why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_engine_env(env)


def test_a_start_request_is_checked_and_a_record_never_shows_the_values() -> None:
    with pytest.raises(ValidationError, match="LD_PRELOAD cannot be given"):
        StartEngine(engine_id="e1", model="m", env={"LD_PRELOAD": "/tmp/x.so"})
    start = StartEngine(
        engine_id="e1", model="m", env={"HF_TOKEN": "hf_top_secret"}, served_model_name="chat"
    )
    record = EngineRecord(engine_id="e1", model="m", env=start.env)
    assert record.env == {"HF_TOKEN": "hf_top_secret"}  # what the process is given
    assert record.public()["env"] == {"HF_TOKEN": "***"}
    assert "hf_top_secret" not in repr(record.public())
    assert masked({"B": "2", "A": "1"}) == {"A": "***", "B": "***"}


def test_a_served_model_name_is_one_plain_argument() -> None:
    with pytest.raises(ValidationError, match="the served model name"):
        StartEngine(engine_id="e1", model="m", served_model_name="--trust-remote-code")
    named = EngineRecord(engine_id="e", model="/w/gemma", served_model_name="gemma")
    assert named.served_name == "gemma"
    assert EngineRecord(engine_id="e", model="/w/gemma").served_name == "/w/gemma"
