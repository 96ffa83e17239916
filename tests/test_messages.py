"""Messages: every type round-trips through flat stream fields; garbage raises DecodeError."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sage_mq.errors import DecodeError
from sage_mq.messages import MESSAGE_TYPES, EngineExited, LaunchEngine, StartEngine
from sage_mq.wire import decode, encode, envelope

SAMPLES = {
    "engine.start": {"engine_id": "e1", "model": "m", "use_gpu": True},
    "engine.stop": {"engine_id": "e1"},
    "engine.restart": {"engine_id": "e1"},
    "engine.relaunch": {"engine_id": "e1", "generation": 2, "attempt": 1},
    "node.evacuate": {"node_id": "n1"},
    "engine.launch": {
        "engine_id": "e1",
        "generation": 1,
        "model": "m",
        "kind": "llm",
        "backend": "fake",
        "host": "127.0.0.1",
        "port": 40000,
    },
    "engine.terminate": {"engine_id": "e1"},
    "health.tick": {},
    "engine.placed": {"engine_id": "e1", "node": "n", "port": 1},
    "engine.starting": {"engine_id": "e1", "node": "n", "generation": 1, "pid": 5, "argv": ["x"]},
    "engine.ready": {"engine_id": "e1", "node": "n", "generation": 1, "url": "http://h:1"},
    "engine.exited": {
        "engine_id": "e1",
        "node": "n",
        "generation": 1,
        "returncode": -9,
        "reason": "killed",
        "last_lines": ["a"],
    },
    "engine.launch_failed": {
        "engine_id": "e1",
        "node": "n",
        "generation": 1,
        "reason": "r",
        "port_in_use": True,
    },
    "engine.port_changed": {
        "engine_id": "e1",
        "node": "n",
        "old_port": 40000,
        "new_port": 40001,
        "reason": "port 40000 on 127.0.0.1 is already in use",
    },
    "node.report": {},
    "node.settle": {"node_id": "n"},
    "engine.adopted": {
        "engine_id": "e1",
        "node": "n",
        "generation": 1,
        "pid": 5,
        "record": {"engine_id": "e1", "model": "m", "state": "STARTING", "gpus": [0]},
        "ready": True,
    },
    "engine.unhealthy": {"engine_id": "e1", "node": "n", "reason": "r"},
    "engine.restarting": {"engine_id": "e1", "attempt": 1, "delay_s": 1.0},
    "engine.failed": {"engine_id": "e1", "reason": "r"},
    "engine.stopped": {"engine_id": "e1"},
    "node.joined": {"node_id": "n", "address": "a", "gpu_count": 2, "epoch": 1},
    "node.lost": {"node_id": "n"},
    "scheduler.elected": {"name": "s1", "epoch": 3},
    "node.health": {"node_id": "n", "results": {"e1": True}},
    "engine.restored": {"engine_id": "e1", "node": "n", "generation": 2, "state": "RUNNING"},
    "request.rejected": {"request_id": "r", "request_type": "engine.start", "reason": "no GPU"},
}


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_message_type_round_trips_through_stream_fields(type_name: str) -> None:
    payload = MESSAGE_TYPES[type_name].model_validate(SAMPLES[type_name])
    env = envelope(payload)
    fields = encode(env)
    assert set(fields) == {"type", "data", "id", "ts", "v"}
    assert all(isinstance(v, str) for v in fields.values())
    assert json.loads(fields["data"]) == payload.model_dump(mode="json")
    back = decode(fields)
    assert back.payload == payload and back.id == env.id and back.type == type_name


def test_messages_are_frozen_and_refuse_unknown_fields() -> None:
    msg = StartEngine(engine_id="e", model="m")
    with pytest.raises(ValidationError):
        msg.model = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        StartEngine(engine_id="e", model="m", colour="red")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({}, "lacks field"),
        ({"type": "engine.stop", "id": "1"}, "lacks field(s) data"),
        ({"type": "engine.explode", "data": "{}", "id": "1"}, "unknown message type"),
        ({"type": "engine.stop", "data": "{not json", "id": "1"}, "invalid engine.stop"),
        ({"type": "engine.stop", "data": "{}", "id": "1"}, "engine_id"),
        ({"type": "engine.stop", "data": '{"engine_id": "e", "x": 1}', "id": "1"}, "x"),
        ({"type": "engine.stop", "data": '{"engine_id": "e"}', "id": "1", "v": "9"}, "version"),
        ({"type": "engine.stop", "data": '{"engine_id": "e"}', "id": "1", "ts": "noon"}, "ts"),
        (
            {"type": "engine.start", "data": '{"engine_id": "a b", "model": "m"}', "id": "1"},
            "engine_id",
        ),
    ],
)
def test_undecodable_entries_raise_one_decode_error(fields: dict[str, str], says: str) -> None:
    with pytest.raises(DecodeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        decode(fields)


def test_an_explicit_message_id_is_kept_for_idempotent_resends() -> None:
    env = envelope(
        EngineExited(engine_id="e", node="n", generation=1, returncode=0, reason="r"),
        message_id="fixed",
    )
    assert decode(encode(env)).id == "fixed"


def test_start_engine_validates_ranges() -> None:
    with pytest.raises(ValidationError):
        StartEngine(engine_id="e", model="m", tensor_parallel_size=0)
    with pytest.raises(ValidationError):
        StartEngine(engine_id="e", model="m", port=70000)
    with pytest.raises(ValidationError):
        LaunchEngine(
            engine_id="e", generation=0, model="m", kind="llm", backend="fake", host="h", port=1
        )
