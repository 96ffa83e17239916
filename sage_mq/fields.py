"""Field types a request fills: the backends and kinds, and free text a record can store, bounded.

Valid JSON can carry an unpaired surrogate (``"\\ud800"``), which no UTF-8 store takes: a
field that ends up in Redis is refused with one here, at the door, not in the scheduler.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, StringConstraints

MAX_METADATA_CHARS = 16_384

Backend = Literal["vllm", "llamacpp", "embedding", "command", "fake"]
"""The backends (contract names; docs/contract.md §3): the one list of them."""
EngineKind = Literal["llm", "embedding"]


def default_backend(kind: str) -> str:
    """``vllm`` for LLM engines, ``embedding`` for embedding engines."""
    return "embedding" if kind == "embedding" else "vllm"


def storable_text(text: str) -> str:
    """Text Redis can store: no unpaired surrogate (valid JSON escapes can carry one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds an unpaired surrogate") from None
    return text


def _storable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata a record can hold: JSON, bounded, storable (nested depth bounded by JSON)."""
    try:
        text = json.dumps(metadata, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("must be plain JSON") from None
    if len(text) > MAX_METADATA_CHARS:
        raise ValueError(f"is {len(text)} characters as JSON; at most {MAX_METADATA_CHARS}")
    storable_text(text)
    return metadata


Label = Annotated[str, StringConstraints(max_length=200), AfterValidator(storable_text)]
"""Free text a person gives an engine (a label): bounded and storable."""
Metadata = Annotated[dict[str, Any], AfterValidator(_storable)]
