"""Field types a request fills: the backends, and free text a record can store, bounded.

Valid JSON can carry an unpaired surrogate (``"\\ud800"``), which no UTF-8 store takes: a
field that ends up in Redis is refused with one here, at the door, not in the scheduler.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, StringConstraints

from sage_mq.engines.argv_policy import check_model
from sage_mq.engines.env_policy import checked_env
from sage_mq.errors import InvalidRequest

MAX_METADATA_CHARS = 16_384

Backend = Literal["vllm", "llamacpp", "embedding", "command", "fake"]
"""The backends (contract names; DESIGN.md section 3)."""


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


def _served_name(name: str) -> str:
    try:
        check_model(name)
    except InvalidRequest as exc:
        raise ValueError(str(exc).replace("the model name", "the served model name")) from None
    return name


EngineEnv = Annotated[dict[str, str], AfterValidator(checked_env)]
"""Environment variables for one engine process (see :mod:`sage_mq.engines.env_policy`)."""
ServedModelName = Annotated[str, AfterValidator(_served_name)]
"""The name clients use for an engine's model, when it is not the weights' id or path."""
