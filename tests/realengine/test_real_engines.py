"""Real engines under sage-mq, as an operator runs them: vLLM's CPU build (chat, streaming,
completions, embeddings) and llama.cpp's server, each in its own venv (``--runtime``), with
real models (Gemma-3-270M, all-MiniLM-L6-v2). Driven through the CLI and the real ``openai``
SDK via the gateway; faults are real signals. Gemma-3-270M here is a base model: the tests
check shapes, token counts and determinism, not wording."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sage_mq.engines.backends import health_paths
from tests.realengine.conftest import ENGINE_START_S, RealFleet, alive, process_tree

pytestmark = [pytest.mark.realengine, pytest.mark.fleet, pytest.mark.timeout(900)]
SECRET = "hf_realtier_0c1d2e"
CHAT = "gemma"
GGUF_CHAT = "gemma-gguf"
EMBED = "minilm"
VLLM_CPU = "--enforce-eager --max-model-len 2048 --max-num-seqs 16"
"""Eager mode (no compile warm-up) and a context that fits a small KV cache on the CPU."""


@pytest.fixture(scope="module")
def vllm_chat(real_fleet: RealFleet) -> dict[str, Any]:
    started = time.monotonic()
    record = real_fleet.start(
        real_fleet.manifest["models"]["chat"],
        "--backend",
        "vllm",
        "--served-model-name",
        CHAT,
        "--extra-args",
        VLLM_CPU,
        "--env",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "--env",
        "HF_HUB_OFFLINE=1",
        "--env",
        f"HF_TOKEN={SECRET}",
    )
    record["cold_start_s"] = time.monotonic() - started
    print(f"vLLM chat engine RUNNING {record['cold_start_s']:.1f}s after `engine start`")
    return record


@pytest.fixture(scope="module")
def llama_chat(real_fleet: RealFleet) -> dict[str, Any]:
    return real_fleet.start(
        real_fleet.manifest["models"]["chat_gguf"],
        "--backend",
        "llamacpp",
        "--served-model-name",
        GGUF_CHAT,
        "--extra-args",
        "--chat_format gemma --n_ctx 2048",
    )


def ask(client: openai.OpenAI, model: str, text: str, **options: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=options.pop("max_tokens", 12),
        temperature=0,
        **options,
    )


def test_the_node_lists_its_runtimes_with_the_versions_found(real_fleet: RealFleet) -> None:
    (node,) = httpx.get(f"{real_fleet.url}/v1/management/nodes", timeout=10).json()
    versions = real_fleet.manifest["versions"]
    assert node["runtimes"]["vllm"] == versions["vllm"]
    assert node["runtimes"]["llamacpp"] == versions["llamacpp"]
    assert "fake" in node["runtimes"]


def test_vllm_serves_chat_streaming_and_completions_through_the_gateway(
    real_fleet: RealFleet, vllm_chat: dict[str, Any]
) -> None:
    assert vllm_chat["argv"][0] == real_fleet.manifest["runtimes"]["vllm"]  # its own venv
    steps = [e.type for e in real_fleet.procs.events(vllm_chat["engine_id"])]
    assert steps.index("engine.starting") < steps.index("engine.ready")  # a load of ~50 s:
    assert "engine.unhealthy" not in steps and "engine.restarting" not in steps  # STARTING
    assert CHAT in real_fleet.served()
    client = real_fleet.client
    first = ask(client, CHAT, "Name three colours.")
    again = ask(client, CHAT, "Name three colours.")
    assert first.model == CHAT and first.choices[0].message.content
    assert first.choices[0].message.content == again.choices[0].message.content  # greedy
    assert 0 < first.usage.completion_tokens <= 12 and first.usage.prompt_tokens > 5
    chunks = list(ask(client, CHAT, "Name three colours.", stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        first.choices[0].message.content
    )
    text = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert text.choices[0].text and text.usage.completion_tokens <= 6
    # the engine's environment: given to the process, shown to no one
    environ = Path(f"/proc/{vllm_chat['pid']}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={SECRET}".encode() in environ
    assert vllm_chat["env"]["HF_TOKEN"] == "***"
    logs = real_fleet.procs.cli("llm", "engine", "logs", vllm_chat["engine_id"]).stdout
    events = real_fleet.procs.cli("llm", "events", "--json", "-n", "500").stdout
    for text_shown in (logs, events, real_fleet.procs.procs.log("agent-n1")):
        assert SECRET not in text_shown


def test_vllm_serves_embeddings_from_a_sentence_transformers_model(
    real_fleet: RealFleet,
) -> None:
    record = real_fleet.start(
        real_fleet.manifest["models"]["embedding"],
        "--engine-kind",
        "embedding",
        "--backend",
        "vllm",
        "--served-model-name",
        EMBED,
        "--extra-args",
        "--runner pooling --enforce-eager",
        "--env",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "--env",
        "HF_HUB_OFFLINE=1",
    )
    try:
        texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Revenue grew 8% in Q3."]
        answer = real_fleet.client.embeddings.create(model=EMBED, input=texts)
        vectors = [item.embedding for item in answer.data]
        assert [len(v) for v in vectors] == [384, 384, 384]
        assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-3) for v in vectors)

        def cosine(a: list[float], b: list[float]) -> float:
            return sum(x * y for x, y in zip(a, b, strict=True))

        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    finally:  # two vLLMs at once would crowd the other tests' memory
        real_fleet.procs.cli("llm", "engine", "stop", record["engine_id"], timeout=90)


def test_llamacpp_serves_chat_from_the_gguf(
    real_fleet: RealFleet, llama_chat: dict[str, Any]
) -> None:
    assert llama_chat["argv"][0] == real_fleet.manifest["runtimes"]["llamacpp"]
    assert "--n_gpu_layers" in llama_chat["argv"]  # none: a CPU engine
    assert llama_chat["argv"][llama_chat["argv"].index("--n_gpu_layers") + 1] == "0"
    client = real_fleet.client
    first = ask(client, GGUF_CHAT, "Name three colours.")
    assert first.choices[0].message.content
    assert first.model == GGUF_CHAT and 0 < first.usage.completion_tokens <= 12
    assert first.usage.prompt_tokens > 5  # in Gemma's turn format (--chat_format gemma)
    chunks = list(ask(client, GGUF_CHAT, "Count to five.", stream=True))
    said = [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert len(chunks) > 2, f"{len(chunks)} chunk(s) streamed: {said}"  # once in CI: 1


def test_llamacpp_streams_to_the_end_while_probed_and_asked_again(
    real_fleet: RealFleet, llama_chat: dict[str, Any]
) -> None:
    """llama.cpp's server, left to its defaults, ends the answer being streamed (with [DONE])
    whenever another request waits for the model, and its /v1/models waits behind the
    generation: a second caller, or the agent's next probe, cut streams short (seen in CI as
    one-chunk answers). Here a probe and a second request come mid-stream; both streams end
    with a finish reason and the probe answers at once."""
    client = real_fleet.client
    first = ask(client, GGUF_CHAT, "Count from one to fifty.", stream=True, max_tokens=64)
    head = [next(first) for _ in range(2)]  # the role, then the first words: it is generating
    second: list[Any] = []
    asking = threading.Thread(
        target=lambda: second.extend(
            c for c in ask(client, GGUF_CHAT, "Name a colour.", stream=True) if c.choices
        )
    )
    asking.start()
    started = time.monotonic()
    answered = [
        httpx.get(llama_chat["url"] + path, timeout=5).status_code
        for path in health_paths("llamacpp", "llm")
    ]
    probed_s = time.monotonic() - started
    chunks = [c for c in head + list(first) if c.choices]
    asking.join(timeout=120)
    assert 200 in answered and probed_s < 2, (answered, probed_s)
    for streamed in (chunks, second):
        said = [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in streamed]
        assert said and said[-1][1] in ("stop", "length"), said


def test_a_50_request_batch_runs_through_rq_workers_on_the_real_engine(
    real_fleet: RealFleet, vllm_chat: dict[str, Any]
) -> None:
    procs = real_fleet.procs
    procs.procs.sage("worker", ["llm", "worker", "run", "--concurrency", "8"], procs.env)
    rows = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": CHAT,
                "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        }
        for i in range(50)
    ]
    upload = "".join(json.dumps(row) + "\n" for row in rows).encode()
    client = real_fleet.client
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(upload)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(0.5)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == (
        "completed",
        50,
        0,
    )
    assert batch.output_file_id is not None
    results = [
        json.loads(line)
        for line in client.files.content(batch.output_file_id).text.split("\n")
        if line
    ]
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in rows)
    for result in results:
        body = result["response"]["body"]
        assert result["response"]["status_code"] == 200 and body["model"] == CHAT
        assert 0 < body["usage"]["completion_tokens"] <= 8


def test_a_restarted_agent_adopts_the_real_engines_and_they_keep_serving(
    real_fleet: RealFleet, vllm_chat: dict[str, Any], llama_chat: dict[str, Any]
) -> None:
    procs = real_fleet.procs
    assert procs.agent is not None
    os.killpg(procs.agent.pid, signal.SIGKILL)  # an agent upgraded or crashed
    procs.start_agent(
        "n1",
        "--runtime",
        f"vllm={real_fleet.manifest['runtimes']['vllm']}",
        "--runtime",
        f"llamacpp={real_fleet.manifest['runtimes']['llamacpp']}",
    )
    for engine in (vllm_chat, llama_chat):
        procs.wait_event("engine.adopted", engine["engine_id"], timeout=60)
        now = real_fleet.record(engine["engine_id"])
        assert (now["pid"], now["generation"], now["port"]) == (
            engine["pid"],
            engine["generation"],
            engine["port"],
        )
    assert ask(real_fleet.client, CHAT, "Hello").choices[0].message.content
    assert ask(real_fleet.client, GGUF_CHAT, "Hello").choices[0].message.content


@pytest.mark.parametrize("which", ["vllm", "llamacpp"])
def test_kill_9_relaunches_on_the_same_port_with_nothing_of_the_old_process_left(
    real_fleet: RealFleet,
    vllm_chat: dict[str, Any],
    llama_chat: dict[str, Any],
    which: str,
) -> None:
    engine = vllm_chat if which == "vllm" else llama_chat
    engine_id = engine["engine_id"]
    before = real_fleet.record(engine_id)
    old_tree = process_tree(before["pid"])
    if which == "vllm":
        assert len(old_tree) >= 2  # the API server and its EngineCore
    os.kill(before["pid"], signal.SIGKILL)
    procs = real_fleet.procs
    procs.wait_event("engine.exited", engine_id, timeout=30)
    deadline = time.monotonic() + ENGINE_START_S
    while (now := real_fleet.record(engine_id))["state"] != "RUNNING" or now["pid"] == before[
        "pid"
    ]:
        assert now["state"] != "FAILED", now
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    assert now["port"] == before["port"] and now["generation"] > before["generation"]
    assert alive(old_tree) == []  # the old EngineCore and workers too
    model = CHAT if which == "vllm" else GGUF_CHAT
    assert ask(real_fleet.client, model, "Hello again").choices[0].message.content
