"""Presets: built-ins load, bad files are refused naming file, engine and field, apply works."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_mq.presets import PresetError, builtin_names, load_preset, parse_preset
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer


def test_the_built_ins_load_and_cover_what_users_ask_for() -> None:
    assert set(builtin_names()) >= {"demo", "qwen-mini-with-embeddings", "qwen-lite"}
    presets = {name: load_preset(name) for name in builtin_names()}
    demo = presets["demo"]
    assert {e.kind for e in demo.engines} == {"llm", "embedding"}
    assert all(e.backend == "fake" and e.use_gpu is False for e in demo.engines)  # runs anywhere
    assert any(
        e.kind == "embedding" and e.use_gpu for p in presets.values() for e in p.engines
    )  # one puts an embedding model on GPU
    assert [demo.engine_id(e) for e in demo.engines] == ["demo-chat", "demo-embed"]
    assert presets["qwen-lite"].engines[0].extra_args == ("--max-model-len", "4096")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nname: p\nengines:\n  - name: chat\n    model: m\n    tensor_paralel: 2\n",
            "engine 'chat' (engines[0]), field 'tensor_paralel': Extra inputs are not permitted",
        ),
        (
            "version: 1\nname: p\nengines:\n  - name: a\n    model: m\n  - name: b\n"
            "    model: m\n    kind: embeding\n",
            "engine 'b' (engines[1]), field 'kind'",
        ),
        ("version: 1\nname: p\nengines:\n  - name: chat\n", "field 'model': Field required"),
        (
            "version: 1\nname: p\nengines:\n  - {name: a, model: m}\n  - {name: a, model: n}\n",
            "two engines are named 'a'",
        ),
        ("version: 2\nname: p\nengines: []\n", "field 'version'"),
        ("name: p\nengines: [\n", "not valid YAML"),
        ("- just\n- a list\n", "a preset is a mapping"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_engine_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(PresetError) as err:
        load_preset(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_an_unknown_name_lists_the_built_ins() -> None:
    with pytest.raises(PresetError, match="built-in: demo"):
        load_preset("no-such-preset")
    with pytest.raises(PresetError, match="engines"):
        parse_preset({"version": 1, "name": "p", "engines": []})


@pytest.mark.fleet
def test_apply_starts_every_engine_once_and_rolls_back_when_one_cannot_start(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler()
    fleet.start_agent("n1", "--fake-gpus", "1x24GiB")
    fleet.wait_node()
    started = fleet.json("llm", "preset", "apply", "demo")
    assert [(r["engine_id"], r["state"]) for r in started] == [
        ("demo-chat", "RUNNING"),
        ("demo-embed", "RUNNING"),
    ]
    again = fleet.json("llm", "preset", "apply", "demo")  # nothing starts twice
    assert [r["pid"] for r in again] == [r["pid"] for r in started]
    too_big = tmp_path / "too-big.yaml"
    too_big.write_text(
        "version: 1\nname: big\nengines:\n"
        "  - {name: small, model: demo, backend: fake, use_gpu: false}\n"
        "  - {name: huge, model: demo, backend: fake, use_gpu: true, required_memory_gb: 500}\n"
    )
    done = fleet.cli("llm", "preset", "apply", str(too_big), check=False)
    assert done.returncode == 1
    assert "engine huge (big-huge)" in done.stderr and "no GPU fits" in done.stderr
    assert "stopped what it had started: big-small" in done.stderr
    fleet.wait_event("engine.stopped", "big-small")
    states = {r["engine_id"]: r["state"] for r in fleet.json("llm", "engine", "list")}
    assert states["big-small"] in ("STOPPING", "STOPPED") and states["big-huge"] == "FAILED"
