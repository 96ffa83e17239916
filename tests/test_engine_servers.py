"""Our engine servers speak OpenAI's shapes: the fake engine and the embedding server."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage_mq.engines.embedding_server import EXIT_MISSING_DEPENDENCY
from sage_mq.engines.embedding_server import build_app as embedding_app
from sage_mq.engines.fake_server import FakeEngine
from sage_mq.engines.fake_server import build_app as fake_app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine")


async def test_fake_engine_health_and_models() -> None:
    async with client(fake_app(FakeEngine("demo"))) as c:
        assert (await c.get("/health")).status_code == 200
        models = (await c.get("/v1/models")).json()
        assert models["data"][0]["id"] == "demo"


async def test_fake_chat_is_deterministic_and_respects_max_tokens() -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "one two three"}]}
    async with client(fake_app(FakeEngine("demo"))) as c:
        first = (await c.post("/v1/chat/completions", json=body)).json()
        second = (await c.post("/v1/chat/completions", json=body)).json()
        short = (await c.post("/v1/chat/completions", json={**body, "max_tokens": 2})).json()
    answer = first["choices"][0]["message"]["content"]
    assert answer == second["choices"][0]["message"]["content"] == "[demo] You said: one two three"
    assert short["choices"][0]["message"]["content"] == "[demo] You"
    assert first["usage"]["prompt_tokens"] == 3 and first["object"] == "chat.completion"


async def test_fake_chat_streams_server_sent_events_ending_with_done() -> None:
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client(fake_app(FakeEngine("demo"))) as c:
        response = await c.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "[demo] You said: hi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_fake_completions_and_embeddings_in_floats_and_base64() -> None:
    engine = FakeEngine("demo", dim=8)
    async with client(fake_app(engine)) as c:
        done = (await c.post("/v1/completions", json={"prompt": "say"})).json()
        floats = (await c.post("/v1/embeddings", json={"input": ["a", "b"]})).json()
        packed = (
            await c.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64"})
        ).json()
    assert done["choices"][0]["text"] == "[demo] You said: say"
    a, b = (row["embedding"] for row in floats["data"])
    assert len(a) == 8 and a != b and abs(sum(x * x for x in a) - 1) < 1e-9
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(a, abs=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": 3}, "prompt"),
        ("/v1/embeddings", {"input": [1, 2]}, "input"),
    ],
)
async def test_fake_engine_answers_bad_bodies_with_openai_errors(
    path: str, body: dict[str, Any], param: str
) -> None:
    async with client(fake_app(FakeEngine("demo"))) as c:
        response = await c.post(path, json=body)
        not_json = await c.post(path, content=b"{nope")
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


class StubEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, sentences: list[str], **kwargs: Any) -> list[list[float]]:
        assert kwargs["normalize_embeddings"] is True
        self.calls.append(sentences)
        return [[float(len(s)), 0.0] for s in sentences]


async def test_embedding_server_encodes_through_its_model_and_limits_batches() -> None:
    encoder = StubEncoder()
    async with client(embedding_app("bge", encoder, max_batch=2)) as c:
        assert (await c.get("/health")).json()["model"] == "bge"
        ok = (await c.post("/v1/embeddings", json={"input": ["ab", "c"]})).json()
        too_many = await c.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
        bad = await c.post("/v1/embeddings", content=b"[")
    assert [row["embedding"] for row in ok["data"]] == [[2.0, 0.0], [1.0, 0.0]]
    assert encoder.calls == [["ab", "c"]]
    assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]["message"]
    assert bad.status_code == 400


def test_embedding_server_without_sentence_transformers_exits_at_once_with_one_line(
    tmp_path: Path,
) -> None:
    # A shim on PYTHONPATH stands for an install without the package, installed here or not.
    (tmp_path / "sentence_transformers.py").write_text("raise ImportError('not installed')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "sage_mq.engines.embedding_server", "--model", "m", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == EXIT_MISSING_DEPENDENCY
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'sage-mq[embedding]'" in lines[0]
