"""The wire format of a stream entry: ``{type, data, id, ts, v}``, flat and redis-cli-readable.

``type`` a dotted message name, ``data`` the JSON payload, ``id`` unique (idempotency), ``ts``
seconds since the epoch, ``v`` the schema version. Payload types are in :mod:`sage_mq.messages`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sage_mq.errors import DecodeError
from sage_mq.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message


class Envelope(BaseModel):
    """One message with its identity: what goes into a stream entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    type: str
    ts: float
    v: int = SCHEMA_VERSION
    payload: Message


def envelope(payload: Message, *, message_id: str | None = None) -> Envelope:
    """Wrap a payload with a fresh id (or a given one, for idempotent re-sends)."""
    return Envelope(
        id=message_id or uuid.uuid4().hex, type=payload.TYPE, ts=time.time(), payload=payload
    )


def encode(env: Envelope) -> dict[str, str]:
    """The flat stream fields of an envelope."""
    return {
        "type": env.type,
        "data": env.payload.model_dump_json(),
        "id": env.id,
        "ts": f"{env.ts:.6f}",
        "v": str(env.v),
    }


def decode(fields: Mapping[str, str]) -> Envelope:
    """An envelope from stream fields; anything unusable raises :class:`DecodeError`."""
    missing = [name for name in ("type", "data", "id") if not fields.get(name)]
    if missing:
        raise DecodeError(f"stream entry lacks field(s) {', '.join(missing)}")
    type_name = fields["type"]
    model = MESSAGE_TYPES.get(type_name)
    if model is None:
        raise DecodeError(f"unknown message type {type_name!r}")
    try:
        version = int(fields.get("v") or SCHEMA_VERSION)
        ts = float(fields.get("ts") or time.time())
    except ValueError as exc:
        raise DecodeError(f"bad v/ts field in {type_name} entry: {exc}") from None
    if version > SCHEMA_VERSION:
        raise DecodeError(
            f"{type_name} has schema version {version}; this build reads ≤ {SCHEMA_VERSION}"
        )
    try:
        payload = model.model_validate_json(fields["data"])
    except ValidationError as exc:
        raise DecodeError(f"invalid {type_name} payload: {_first_error(exc)}") from None
    return Envelope(id=fields["id"], type=type_name, ts=ts, v=version, payload=payload)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
    return f"{where}: {err.get('msg', 'invalid')} ({exc.error_count()} error(s))"


def to_json(env: Envelope) -> dict[str, Any]:
    """A JSON-ready dict of an envelope, for ``--json`` output and logs."""
    out: dict[str, Any] = json.loads(env.model_dump_json(exclude={"payload"}))
    out["data"] = env.payload.model_dump(mode="json")
    return out
