"""Presets: built-ins load, bad files are refused naming file, engine and field, apply works."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sage_mq.presets import PresetError, builtin_names, load_builtin, load_preset, parse_preset
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


LAUGHS = "version: 1\nname: lol\na0: &a0 [lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)
"""A billion laughs: 10**9 strings once expanded, under a kilobyte as written."""


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
        (LAUGHS, "expands to more than 100000 values through YAML aliases"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        (
            "version: 1\nname: p\nengines:\n  - name: sh\n    model: m\n    backend: vllm\n"
            "    extra_args: --port 22\n",
            "engine 'sh' (engines[0]): Value error, --port cannot be given",
        ),
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


def test_a_billion_laughs_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(LAUGHS)
    started = time.monotonic()
    with pytest.raises(PresetError, match="through YAML aliases"):
        load_preset(path)
    assert time.monotonic() - started < 1  # refused before the 10**9 strings exist
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(PresetError, match="larger than 1024 KiB"):
        load_preset(path)


def test_a_built_in_is_named_never_read_from_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text("secret = 'do-not-echo'\n")
    monkeypatch.chdir(tmp_path)
    for name in ("config.toml", "../etc/passwd", "/etc/passwd", "demo.yaml"):
        with pytest.raises(PresetError) as err:
            load_builtin(name)
        assert "do-not-echo" not in str(err.value) and "built-in: demo" in str(err.value)
    assert load_builtin("demo").name == "demo"


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


def test_a_preset_names_what_clients_ask_for_and_hands_engines_hidden_variables(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    preset = tmp_path / "named.yaml"
    preset.write_text(
        "version: 1\nname: named\nengines:\n"
        "  - name: chat\n    model: /weights/demo\n    backend: fake\n    use_gpu: false\n"
        "    served_model_name: chatty\n    env: {HF_TOKEN: hf_preset_9z8y, OMP_NUM_THREADS: '1'}\n"
    )
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    shown = fleet.cli("llm", "preset", "show", str(preset)).stdout
    assert "hf_preset_9z8y" not in shown and "HF_TOKEN: '***'" in shown
    fleet.start_scheduler()
    fleet.start_agent()
    fleet.wait_node()
    (record,) = fleet.json("llm", "preset", "apply", str(preset))
    assert record["served_model_name"] == "chatty" and record["env"]["HF_TOKEN"] == "***"
    environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
    assert b"HF_TOKEN=hf_preset_9z8y" in environ and b"OMP_NUM_THREADS=1" in environ
    with pytest.raises(PresetError, match="PYTHONPATH cannot be given"):
        parse_preset(
            {"version": 1, "name": "p", "engines": [{"name": "e", "model": "m",
                                                     "env": {"PYTHONPATH": "/tmp"}}]},
            source="p.yaml",
        )  # fmt: skip
