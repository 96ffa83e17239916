"""Fuzzing with hypothesis: garbage into every decoder gives a dead letter or a clear error,
never a crashed actor, a traceback or a 5xx.

- stream entries: ``decode`` either decodes or raises ``DecodeError``; through a real consumer on
  a real Redis, every garbage entry is dead-lettered with its reason and the loop goes on;
- presets: ``parse_preset`` and ``load_preset`` give a preset or a ``PresetError``;
- the gateway: every operation of its OpenAPI document, and the three inference routes, with
  random path parameters, query strings and bodies: never a 5xx, always JSON.

(schemathesis is not installable here; the gateway part generates requests from the OpenAPI
document itself, the way schemathesis does.)
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from sage_mq.bus import Bus
from sage_mq.connection import connect
from sage_mq.errors import DecodeError
from sage_mq.gateway import create_app
from sage_mq.gateway.inference import PATHS
from sage_mq.keys import Keys
from sage_mq.messages import MESSAGE_TYPES, StopEngine
from sage_mq.presets import Preset, PresetError, load_preset, parse_preset
from sage_mq.settings import Settings
from sage_mq.wire import Envelope, decode

CASES = 300
"""Examples per property (recorded in docs/development.md)."""
QUICK = hypothesis_settings(
    max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck)
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


def shaped_like(field_names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with a model's own field names and values of any kind: past the first checks."""
    return st.dictionaries(st.sampled_from(field_names), json_values, max_size=len(field_names))


def entry_fields() -> st.SearchStrategy[dict[str, str]]:
    """Stream entries: random fields, or our fields with wrong or half-right contents."""
    types = st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=12)
    payloads = st.one_of(
        st.text(max_size=40),
        json_values.map(json.dumps),
        st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(
            lambda t: shaped_like(list(MESSAGE_TYPES[t].model_fields)).map(json.dumps)
        ),
    )
    ours = st.fixed_dictionaries(
        {"type": types, "data": payloads, "id": st.text(max_size=8)},
        optional={"ts": st.text(max_size=8), "v": st.text(max_size=4)},
    )
    return ours | st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=5)


@QUICK
@given(entry_fields())
def test_a_stream_entry_decodes_or_says_why_not(fields: dict[str, str]) -> None:
    try:
        decode(fields)
    except DecodeError as exc:
        assert str(exc)


@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(entry_fields(), min_size=1, max_size=15))
def test_garbage_entries_are_dead_lettered_and_the_consumer_goes_on(
    settings: Settings, garbage: list[dict[str, str]]
) -> None:
    asyncio.run(_consume_garbage(settings, [g for g in garbage if g and not _decodes(g)]))


async def _consume_garbage(settings: Settings, garbage: list[dict[str, str]]) -> None:
    redis = connect(settings)
    bus = Bus(redis, Keys(settings.namespace), settings.bus)
    stream = f"{settings.namespace}:fuzz:{uuid.uuid4().hex[:8]}"
    try:
        dead_before = await redis.xlen(bus.keys.dead)
        for fields in garbage:
            await redis.xadd(stream, fields)
        await bus.publish(stream, StopEngine(engine_id="after-the-garbage"))
        seen: list[str] = []

        async def handler(env: Envelope) -> None:
            assert isinstance(env.payload, StopEngine)
            seen.append(env.payload.engine_id)

        await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
        assert seen == ["after-the-garbage"]
        dead = (await redis.xrange(bus.keys.dead))[dead_before:]
        assert len(dead) == len(garbage) and all(f["reason"] for _id, f in dead)
    finally:
        await redis.aclose()


def _decodes(fields: dict[str, str]) -> bool:
    try:
        decode(fields)
    except DecodeError:
        return False
    return True


@QUICK
@given(json_values | shaped_like(list(Preset.model_fields)))
def test_a_preset_parses_or_names_what_is_wrong(data: Any) -> None:
    try:
        assert isinstance(parse_preset(data, source="fuzz.yaml"), Preset)
    except PresetError as exc:
        assert str(exc).startswith("fuzz.yaml")


@hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_a_preset_file_loads_or_names_what_is_wrong(tmp_path_factory: Any, text: str) -> None:
    path: Path = tmp_path_factory.mktemp("p") / "fuzz.yaml"
    path.write_text(text)
    try:
        load_preset(path)
    except PresetError as exc:
        assert str(path) in str(exc)


def test_the_gateway_answers_garbage_with_4xx_json_never_5xx(settings: Settings) -> None:
    app = create_app(settings)
    document = app.openapi()
    schemas = document["components"]["schemas"]
    operations = [(path, "post", {}) for path in sorted(PATHS)]
    for path, methods in document["paths"].items():
        operations += [(path, method, spec) for method, spec in methods.items()]
    calls = {"n": 0}

    with TestClient(app, raise_server_exceptions=False) as client:

        @QUICK
        @given(st.sampled_from(operations).flatmap(lambda op: _request_for(op, schemas)))
        def answers(request: tuple[str, str, dict[str, Any], Any]) -> None:
            method, path, params, body = request
            kwargs: dict[str, Any] = {"params": params}
            if body is not None:
                kwargs["content"] = body if isinstance(body, bytes) else json.dumps(body)
            reply = client.request(method, path, **kwargs)
            calls["n"] += 1
            assert reply.status_code < 500, (method, path, params, body, reply.text)
            if path not in ("/metrics",) and not path.endswith("/content"):
                reply.json()  # JSON, whatever was sent

        answers()
    assert calls["n"] >= CASES


def _request_for(
    operation: tuple[str, str, dict[str, Any]], schemas: dict[str, Any]
) -> st.SearchStrategy[tuple[str, str, dict[str, Any], Any]]:
    path, method, spec = operation
    names = re.findall(r"\{([^}]+)\}", path)
    path_values = st.fixed_dictionaries({n: st.text(min_size=1, max_size=12) for n in names})
    query = {
        p["name"]: scalars.map(lambda v: "" if v is None else str(v))
        for p in spec.get("parameters", [])
        if p.get("in") == "query" and p["name"] != "wait"  # waiting for RUNNING: not garbage
    }
    params = st.fixed_dictionaries({}, optional=query)
    fields = _body_fields(spec, schemas)
    bodies = st.none() | json_values | st.binary(max_size=40)
    if fields:
        bodies |= shaped_like(fields)
    return st.tuples(path_values, params, bodies).map(
        lambda t: (method.upper(), _fill(path, t[0]), t[1], t[2])
    )


def _fill(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", quote(value, safe="") or "x")
    return path


def _body_fields(spec: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    """Top-level field names of an operation's JSON body, ``wait`` left out (see above)."""
    body = spec.get("requestBody", {}).get("content", {}).get("application/json", {})
    name = body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
    return sorted(set(schemas.get(name, {}).get("properties", {})) - {"wait"})
