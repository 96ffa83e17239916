"""Records as Redis hashes, readable with ``redis-cli HGETALL``.

Plain string fields are stored as they are; every other field as JSON (``[0, 1]``, ``true``,
``null``, ``40001``), so a record reads naturally in redis-cli and decodes without guessing.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sage_mq.errors import DecodeError

M = TypeVar("M", bound=BaseModel)

_RAW = {
    "status",
    "engine_id",
    "model",
    "kind",
    "backend",
    "state",
    "node",
    "host",
    "url",
    "last_error",
    "engine_label",
    "requested_node",
    "lost_node",
    "node_id",
    "address",
    "hostname",
    "name",
}


def to_hash(record: BaseModel, only: set[str] | None = None) -> dict[str, str]:
    """Hash fields of a record (all of them, or ``only`` these)."""
    data = record.model_dump(mode="json", include=only)
    return {k: _field(k, v) for k, v in data.items()}


def _field(name: str, value: Any) -> str:
    if name in _RAW:
        return "" if value is None else str(value)
    return json.dumps(value)


def from_hash(model: type[M], fields: dict[str, str]) -> M:
    """A record from hash fields; raises :class:`DecodeError` if it is not one of ours."""
    data: dict[str, Any] = {}
    for name, raw in fields.items():
        if name in _RAW:
            field = model.model_fields.get(name)
            empty_is_none = raw == "" and field is not None and field.default is None
            data[name] = None if empty_is_none else raw
        else:
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError:
                raise DecodeError(f"{model.__name__} field {name}={raw!r} is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DecodeError(f"bad {model.__name__}: {exc.errors()[0]}") from None
