"""OpenAI-compatible response bodies shared by our engine servers (fake and embedding)."""

from __future__ import annotations

import base64
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


def models_body(model: str, owned_by: str) -> dict[str, Any]:
    """``GET /v1/models`` for a server of one model."""
    entry = {"id": model, "object": "model", "created": 0, "owned_by": owned_by}
    return {"object": "list", "data": [entry]}


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """The texts of an embeddings request; raises ValueError with a message for the user."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return list(raw)
    raise ValueError("'input' must be a non-empty string or list of strings")


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


def chat_body(model: str, content: str, prompt_tokens: int) -> dict[str, Any]:
    """A non-streaming chat completion."""
    completion_tokens = len(content.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_chunk(
    chunk_id: str, model: str, delta: dict[str, str], finish: str | None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a streamed answer."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def completion_body(model: str, text: str, prompt_tokens: int) -> dict[str, Any]:
    """A legacy ``text_completion``."""
    completion_tokens = len(text.split())
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
