"""Backends build real argv and env: vLLM, our embedding server, command templates, fake."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from sage_mq.engines.backends import (
    build_argv,
    build_env,
    gpu_memory_utilization,
    health_paths,
    startup_timeout_s,
)
from sage_mq.errors import InvalidRequest
from sage_mq.messages import LaunchEngine
from sage_mq.redis_urls import url_secrets
from sage_mq.settings import engine_base_env


def launch(**overrides: Any) -> LaunchEngine:
    fields: dict[str, Any] = dict(
        engine_id="e",
        generation=1,
        model="Qwen/Qwen2.5-1.5B-Instruct",
        kind="llm",
        backend="vllm",
        host="10.1.2.3",
        port=40001,
    )
    fields.update(overrides)
    return LaunchEngine(**fields)


def test_vllm_argv_is_the_openai_api_server_with_parallelism_and_extra_args() -> None:
    cmd = launch(
        gpus=(2, 3),
        use_gpu=True,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.42,
        extra_args=("--max-model-len", "4096"),
    )
    assert build_argv(cmd, python="/py") == [
        "/py",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "--host",
        "10.1.2.3",
        "--port",
        "40001",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.42",
        "--max-model-len",
        "4096",
    ]
    assert build_env(cmd, {"PATH": "/bin"})["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_a_user_gpu_memory_utilization_wins_over_ours() -> None:
    cmd = launch(gpu_memory_utilization=0.3, extra_args=("--gpu-memory-utilization", "0.8"))
    argv = build_argv(cmd)
    assert argv.count("--gpu-memory-utilization") == 1 and argv[-1] == "0.8"


@pytest.mark.parametrize(
    ("use_gpu", "gpus", "device", "visible"), [(True, (1,), "cuda", "1"), (False, (), "cpu", "")]
)
def test_embedding_server_argv_names_the_device_and_env_hides_gpus_for_cpu(
    use_gpu: bool, gpus: tuple[int, ...], device: str, visible: str
) -> None:
    cmd = launch(
        kind="embedding", backend="embedding", model="BAAI/bge-m3", use_gpu=use_gpu, gpus=gpus
    )
    assert build_argv(cmd, python="/py") == [
        "/py",
        "-m",
        "sage_mq.engines.embedding_server",
        "--model",
        "BAAI/bge-m3",
        "--host",
        "10.1.2.3",
        "--port",
        "40001",
        "--device",
        device,
    ]
    env = build_env(cmd, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "HOME": "/h"})
    assert env["CUDA_VISIBLE_DEVICES"] == visible and env["HOME"] == "/h"


def test_command_backend_fills_placeholders_without_a_shell() -> None:
    cmd = launch(
        backend="command",
        use_gpu=True,
        gpus=(0,),
        extra_args=(
            "my-server",
            "--model={model}",
            "--bind",
            "{host}:{port}",
            "--device",
            "{device}",
            "; rm -rf /",
        ),
    )
    assert build_argv(cmd) == [
        "my-server",
        "--model=Qwen/Qwen2.5-1.5B-Instruct",
        "--bind",
        "10.1.2.3:40001",
        "--device",
        "cuda",
        "; rm -rf /",
    ]
    with pytest.raises(InvalidRequest, match="argv template"):
        build_argv(launch(backend="command"))
    allowed = {"my-server": "/opt/bin/my-server"}  # what the node's operator allowed, resolved
    assert build_argv(cmd, executables=allowed)[0] == "/opt/bin/my-server"


def test_engines_never_see_the_agents_secrets() -> None:
    env = {
        "PATH": "/usr/bin",
        "HF_TOKEN": "hf-needed-by-engines",
        "SAGE_MQ_REDIS_URL": "redis://fleet:redis-pw-1@10.0.0.2:6379/0",
        "SAGE_MQ_API_KEY": "api-key-2",
        "SAGE_MQ_ADMIN_KEY": "admin-key-3",
        "SAGE_MQ_NAMESPACE": "sage",
        "SAGE_CONTROL_PLANE_URL": "http://gw:8000/v1",
        "SAGE_MQ_SECRET_ENV": "AWS_SECRET_ACCESS_KEY, OTHER",
        "AWS_SECRET_ACCESS_KEY": "aws-4",
        "BACKUP_URL": "redis://:redis-pw-1@backup:6379",  # the password, copied
        "OPENAI_API_KEY": "admin-key-3",  # a gateway key, copied
        "CLIENT_KEY": "from-up-5",
        "SHORT": "pw",
    }
    base = engine_base_env(env, secrets=["from-up-5", "pw"])  # pw: too short to judge by
    assert base == {"PATH": "/usr/bin", "HF_TOKEN": "hf-needed-by-engines", "SHORT": "pw"}
    assert url_secrets("rediss://u:p%40ss@h:1/0") == ["p@ss", "p%40ss", "rediss://u:p%40ss@h:1/0"]
    assert url_secrets("redis://h:6379/0") == []


def test_fake_backend_runs_our_fake_engine_with_fault_flags() -> None:
    argv = build_argv(launch(backend="fake", extra_args=("--crash-after", "2")))
    assert argv[:3] == [sys.executable, "-m", "sage_mq.engines.fake_server"]
    assert argv[-2:] == ["--crash-after", "2"] and "--kind" in argv


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="unknown backend"):
        build_argv(launch(backend="tgi"))


def test_health_paths_and_startup_times_per_backend() -> None:
    assert health_paths("vllm", "llm") == ("/health", "/v1/models")
    assert health_paths("embedding", "embedding") == ("/health",)
    # llama.cpp has no /health, and its /v1/models waits for the model's lock
    assert health_paths("llamacpp", "llm") == health_paths("llamacpp", "embedding")
    assert health_paths("llamacpp", "llm") == ("/health", "/docs")
    assert startup_timeout_s("vllm") > 600 > startup_timeout_s("fake")


@pytest.mark.parametrize(
    ("need", "total", "fraction"),
    [(8.0, 80.0, 0.1), (7.9, 80.0, 0.1), (0.5, 80.0, 0.05), (90, 80, 0.95)],
)
def test_vllm_gets_the_fraction_of_the_gpu_that_was_reserved(
    need: float, total: float, fraction: float
) -> None:
    assert gpu_memory_utilization(need, total) == fraction


@pytest.mark.parametrize(
    ("kind", "use_gpu", "gpus", "layers", "embedding"),
    [
        ("llm", True, (0,), "-1", False),
        ("llm", False, (), "0", False),
        ("embedding", False, (), "0", True),
    ],
)
def test_llamacpp_argv_puts_every_layer_on_given_gpus_and_serves_embeddings_when_asked(
    kind: str, use_gpu: bool, gpus: tuple[int, ...], layers: str, embedding: bool
) -> None:
    cmd = launch(
        kind=kind,
        backend="llamacpp",
        model="/m/gemma.gguf",
        use_gpu=use_gpu,
        gpus=gpus,
        served_model_name="gemma",
        extra_args=("--n_ctx", "2048"),
    )
    argv = build_argv(cmd, python="/venvs/llama/bin/python")
    assert argv[:11] == [
        "/venvs/llama/bin/python",
        "-m",
        "llama_cpp.server",
        "--model",
        "/m/gemma.gguf",
        "--host",
        "10.1.2.3",
        "--port",
        "40001",
        "--n_gpu_layers",
        layers,
    ]
    assert argv[11:13] == ["--interrupt_requests", "false"]  # requests queue, none is cut off
    assert (argv[13:15] == ["--embedding", "true"]) is embedding
    assert argv[-4:] == ["--model_alias", "gemma", "--n_ctx", "2048"]


def test_served_model_name_reaches_vllm_and_our_engines() -> None:
    for backend in ("vllm", "fake", "embedding"):
        argv = build_argv(launch(backend=backend, served_model_name="chat"))
        assert argv[argv.index("--served-model-name") + 1] == "chat"
        assert "--served-model-name" not in build_argv(launch(backend=backend))
    template = ("srv", "--name", "{served_model_name}")
    assert build_argv(launch(backend="command", extra_args=template))[-1] == (
        "Qwen/Qwen2.5-1.5B-Instruct"
    )


def test_engine_env_is_the_requests_variables_and_nothing_that_moves_the_engine() -> None:
    base = {"PATH": "/bin", "PORT": "8080", "HOST": "0.0.0.0", "VLLM_API_KEY": "k", "TZ": "UTC"}
    env = build_env(launch(env={"HF_TOKEN": "hf_1", "OMP_NUM_THREADS": "2"}), base)
    assert env["HF_TOKEN"] == "hf_1" and env["OMP_NUM_THREADS"] == "2" and env["TZ"] == "UTC"
    assert "PORT" not in env and "HOST" not in env and "VLLM_API_KEY" not in env
    assert env["VLLM_HOST_IP"] == "10.1.2.3"  # vLLM's own address: the one it was placed on
    assert "VLLM_HOST_IP" not in build_env(launch(backend="llamacpp"), base)


def test_llamacpp_usage_errors_are_permanent_and_it_may_load_for_minutes() -> None:
    from sage_mq.engines.backends import permanent_exit

    assert permanent_exit("llamacpp", 2) is not None and permanent_exit("llamacpp", 1) is None
    assert startup_timeout_s("llamacpp") >= 600
