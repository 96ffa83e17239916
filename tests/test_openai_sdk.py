"""The real ``openai`` SDK against the gateway, resource by resource: what we claim to serve
answers in OpenAI's shapes (the SDK's own types parse it), and what we refuse, it raises as
OpenAI's errors."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from tests.helpers.batches import jsonl, wait_batch
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import models, start, wait_for
from tests.helpers.servers import Processes

pytestmark = pytest.mark.fleet


@pytest.fixture
def sdk(batch_fleet: tuple[FleetProcs, openai.OpenAI]) -> openai.OpenAI:
    """The SDK on a gateway serving ``demo`` (chat) and ``vec`` (embeddings)."""
    fleet, client = batch_fleet
    start(fleet, "vec", "--engine-kind", "embedding")
    base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    wait_for(lambda: models(base) == ["demo", "vec"])
    return client


def test_models_list_and_retrieve(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["demo", "vec"]
    found = sdk.models.retrieve("demo")
    assert (found.id, found.object, found.owned_by) == ("demo", "model", "sage-mq")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("nope")
    assert missing.value.code == "model_not_found"


def test_chat_answers_n_choices_and_says_when_max_tokens_cut_it(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "one two three four"}]
    whole = sdk.chat.completions.create(model="demo", messages=messages, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert {c.finish_reason for c in whole.choices} == {"stop"}
    assert whole.choices[0].message.content == "[demo] You said: one two three four"
    assert whole.usage is not None and whole.usage.completion_tokens == 3 * 7
    cut = sdk.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (
        "[demo] You",
        "length",
    )
    legacy = sdk.completions.create(model="demo", prompt="a b", n=2, max_tokens=1)
    assert [(c.text, c.finish_reason) for c in legacy.choices] == [("[demo]", "length")] * 2


def test_a_stream_ends_with_the_usage_when_asked(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[demo] You said: hi"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 1 + 4
    plain = list(
        sdk.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.choices for c in plain)  # no usage chunk unless asked


def test_embeddings_shorten_to_the_dimensions_asked(sdk: openai.OpenAI) -> None:
    full = sdk.embeddings.create(model="vec", input=["a", "b"])  # base64, the SDK's default
    assert len(full.data) == 2 and len(full.data[0].embedding) == 384
    short = sdk.embeddings.create(model="vec", input="a", dimensions=8)
    vector = short.data[0].embedding
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1.0) < 1e-6
    with pytest.raises(openai.BadRequestError, match="this model's vectors have 384"):
        sdk.embeddings.create(model="vec", input="a", dimensions=385)


def test_a_model_sent_to_an_endpoint_it_does_not_serve_is_refused(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="use /v1/embeddings") as chat:
        sdk.chat.completions.create(model="vec", messages=[{"role": "user", "content": "x"}])
    assert chat.value.code == "model_not_supported"
    with pytest.raises(openai.NotFoundError, match="use /v1/chat/completions"):
        sdk.embeddings.create(model="demo", input="x")


def test_files_and_batches_as_openai_answers_them(
    sdk: openai.OpenAI, batch_fleet: tuple[FleetProcs, openai.OpenAI], processes: Processes
) -> None:
    fleet, _ = batch_fleet
    processes.sage("worker", ["llm", "worker", "run"], fleet.env)
    uploaded = sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl(3))), purpose="batch")
    assert uploaded.id in [f.id for f in sdk.files.list()]
    assert sdk.files.retrieve(uploaded.id).bytes == len(jsonl(3))
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(sdk, batch.id, {"completed"})
    assert batch.id in [b.id for b in sdk.batches.list()]
    with pytest.raises(openai.ConflictError, match="its status is 'completed'"):
        sdk.batches.cancel(batch.id)
    lines = sdk.files.content(done.output_file_id).text.splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["response"]["status_code"] == 200
    deleted = sdk.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete(uploaded.id)


def test_unknown_routes_and_methods_are_openai_errors(sdk: openai.OpenAI) -> None:
    base = str(sdk.base_url).rstrip("/")
    for method, path, status in (
        ("GET", "/nope", 404),
        ("DELETE", "/models/demo", 405),
        ("PUT", "/files", 405),
    ):
        answer = httpx.request(method, f"{base}{path}", timeout=10)
        error = answer.json()["error"]
        assert answer.status_code == status and set(error) == {"message", "type", "param", "code"}
