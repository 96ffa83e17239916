"""OpenAI-compatible response bodies shared by our engine servers (fake and embedding)."""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any


def error_body(
    message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape for a 4xx."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def model_object(model: str, owned_by: str) -> dict[str, Any]:
    """OpenAI's model object (an entry of ``GET /v1/models``, or ``GET /v1/models/{model}``)."""
    return {"id": model, "object": "model", "created": 0, "owned_by": owned_by}


def models_body(model: str, owned_by: str) -> dict[str, Any]:
    """``GET /v1/models`` for a server of one model."""
    return {"object": "list", "data": [model_object(model, owned_by)]}


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """The texts of an embeddings request; raises ValueError with a message for the user."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return list(raw)
    raise ValueError("'input' must be a non-empty string or list of strings")


MAX_CHOICES = 128
"""The most answers one request may ask for (``n``), as OpenAI allows."""


def choices_wanted(body: dict[str, Any]) -> int:
    """``n``: how many answers a completion request asks for; ValueError says what is wrong."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ValueError(f"'n' must be an integer from 1 to {MAX_CHOICES}")
    return n


def dimensions_wanted(body: dict[str, Any], full: int) -> int:
    """``dimensions``: the length of the vectors asked for (at most the model's ``full``)."""
    dimensions = body.get("dimensions")
    if dimensions is None:
        return full
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise ValueError("'dimensions' must be a positive integer")
    if dimensions > full:
        raise ValueError(f"'dimensions' is {dimensions}; this model's vectors have {full}")
    return dimensions


def shortened(vector: Sequence[float], dimensions: int) -> list[float]:
    """The first ``dimensions`` values, made unit length again (as OpenAI shortens vectors);
    the vector as it is when that is all of it."""
    if dimensions >= len(vector):
        return list(vector)
    head = list(vector[:dimensions])
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def wants_usage_in_stream(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``: a last chunk with the usage, and ``usage: null`` on
    every chunk before it."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def embeddings_body(
    model: str, vectors: Sequence[Sequence[float]], texts: Sequence[str], encoding_format: str
) -> dict[str, Any]:
    """``POST /v1/embeddings`` response, as floats or as base64 float32 (the SDK's default)."""
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = list(vector)
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(t.split()) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


Answer = tuple[str, str]
"""One choice: its text and why it ended (``stop``, or ``length`` when ``max_tokens`` cut it)."""


def chat_body(model: str, answers: Sequence[Answer], prompt_tokens: int) -> dict[str, Any]:
    """A non-streaming chat completion, one choice per answer."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        for i, (text, finish) in enumerate(answers)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(len(text.split()) for text, _ in answers)),
    }


def chat_chunk(
    chunk_id: str,
    model: str,
    delta: dict[str, str],
    finish: str | None,
    *,
    index: int = 0,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a streamed answer (``usage: null`` when the request
    asked for the usage at the end)."""
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(chunk_id: str, model: str, counted: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for ``include_usage``: no choices, the usage."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": counted,
    }


def completion_body(model: str, answers: Sequence[Answer], prompt_tokens: int) -> dict[str, Any]:
    """A legacy ``text_completion``, one choice per answer."""
    choices = [
        {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        for i, (text, finish) in enumerate(answers)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(len(text.split()) for text, _ in answers)),
    }
