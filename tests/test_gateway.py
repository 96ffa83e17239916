"""The gateway with real processes and the real OpenAI SDK: routing, streaming, failures."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import models, run_gateway, start, wait_for
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet


@pytest.fixture
def gateway(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[FleetProcs, str]]:
    yield run_gateway(processes, redis_server, tmp_path)


def test_the_openai_sdk_works_unchanged_and_requests_spread_over_replicas(
    gateway: tuple[FleetProcs, str], sdk: Callable[..., openai.OpenAI]
) -> None:
    fleet, url = gateway
    replicas = {start(fleet, "demo", "--extra-args", "--latency-ms 30")["engine_id"] for _ in "ab"}
    start(fleet, "mini-embed", "--engine-kind", "embedding")
    wait_for(lambda: set(models(url)) == {"demo", "mini-embed"})
    client = sdk(f"{url}/v1")
    answer = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.choices[0].message.content == "[demo] You said: hello"
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], stream=True
        )
    )
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "[demo] You said: hello"
    vectors = client.embeddings.create(model="mini-embed", input=["a", "b"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]

    def served_by(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "x"}]
        )
        return str(raw.headers["x-sage-engine"])

    with ThreadPoolExecutor(8) as pool:  # concurrent requests spread by requests in flight
        served = Counter(pool.map(served_by, range(40)))
    assert set(served) == replicas and min(served.values()) >= 8
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert "models being served: demo, mini-embed" in str(err.value)


def test_a_dead_replica_costs_no_request_and_a_stopped_one_leaves_rotation(
    gateway: tuple[FleetProcs, str], sdk: Callable[..., openai.OpenAI]
) -> None:
    fleet, url = gateway
    first, second = start(fleet, "demo"), start(fleet, "demo")
    wait_for(lambda: models(url) == ["demo"])
    client = sdk(f"{url}/v1")
    os.killpg(int(str(first["pid"])), signal.SIGKILL)  # still in rotation for a moment
    for _ in range(10):  # each request that meets the dead one goes on to the other
        answer = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "still here?"}]
        )
        assert answer.choices[0].message.content == "[demo] You said: still here?"
    fleet.cli("llm", "engine", "stop", str(second["engine_id"]))
    fleet.wait_event("engine.ready", str(first["engine_id"]), count=2)  # restarted by then
    wait_for(lambda: models(url) == ["demo"])
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-sage-engine"] == first["engine_id"]
    fleet.cli("llm", "engine", "stop", str(first["engine_id"]))
    wait_for(lambda: models(url) == [])
    with pytest.raises(openai.APIStatusError) as err:  # stopped, so nothing will bring it back
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "'demo' is not served now" in str(err.value)


def test_a_model_on_its_way_is_503_with_retry_after_and_a_stopped_one_404(
    gateway: tuple[FleetProcs, str],
) -> None:
    fleet, url = gateway
    fleet.cli("llm", "engine", "start", "slow", "--backend", "fake", "--no-gpu",
              "--extra-args", "--startup-delay 3")  # fmt: skip
    chat = {"model": "slow", "messages": [{"role": "user", "content": "x"}]}
    wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 503)
    starting = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=5)
    assert starting.headers["retry-after"] == "2" and "on its way" in starting.text
    wait_for(lambda: models(url) == ["slow"], 30)
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=5).status_code == 200
    never = {"model": "never-seen", "messages": [{"role": "user", "content": "x"}]}
    unknown = httpx.post(f"{url}/v1/chat/completions", json=never, timeout=5)
    assert unknown.status_code == 404 and "does not exist here" in unknown.text


def _one_request(client: httpx.Client, url: str, streaming: bool) -> tuple[str, str | None, str]:
    """(kind, engine that answered, what went wrong: "" when the whole answer came)."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "a b c d e f g h"}]}
    kind, engine = ("stream" if streaming else "plain"), None
    try:
        if streaming:
            with client.stream(
                "POST", f"{url}/v1/chat/completions", json=body | {"stream": True}
            ) as r:
                engine = r.headers.get("x-sage-engine")
                text = "".join(r.iter_text())
            whole = r.status_code == 200 and text.endswith("data: [DONE]\n\n")
            return kind, engine, "" if whole else text[-300:]
        r = client.post(f"{url}/v1/chat/completions", json=body)
        engine = r.headers.get("x-sage-engine")
        whole = r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith("h")
        return kind, engine, "" if whole else r.text
    except httpx.HTTPError as exc:
        return kind, engine, repr(exc)


def test_killing_one_of_two_replicas_under_load_fails_only_streams_it_had_begun(
    gateway: tuple[FleetProcs, str],
) -> None:
    fleet, url = gateway
    slow = ("--extra-args", "--latency-ms 20 --stream-delay-ms 20")
    victim, survivor = start(fleet, "demo", *slow), start(fleet, "demo", *slow)
    wait_for(lambda: models(url) == ["demo"])
    results: list[tuple[str, str | None, str]] = []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                results.append(_one_request(client, url, streaming=i % 2 == 0))

    with ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop, i) for i in range(8)]
        try:
            time.sleep(1.5)
            served_before = {engine for _, engine, _ in results}
            before = [r for r in results if r[2]]
            at_kill = len(results)
            os.killpg(int(str(victim["pid"])), signal.SIGKILL)
            time.sleep(2.0)
        finally:
            stop.set()
        for loop in loops:
            loop.result()
    assert not before, f"failures before the kill: {before[:3]}"
    assert served_before == {victim["engine_id"], survivor["engine_id"]}
    failed = [r for r in results if r[2]]
    # only streams the victim had begun (headers sent, so no retry) may fail, and they end with
    # an error event an SDK raises on
    for kind, engine, what in failed:
        assert (kind, engine) == ("stream", victim["engine_id"]), what
        assert '"code": "engine_lost"' in what, what
    after = results[at_kill:]
    assert sum(not what for *_, what in after) >= 40  # the gateway kept serving through the loss
    assert not [what for kind, _, what in after if kind == "plain" and what]


def test_several_gateway_processes_share_the_port_and_the_keys(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet, url = run_gateway(processes, redis_server, tmp_path, "--workers", "2", "--api-key", "k1")
    start(fleet, "demo")
    gateway = next(p for p in processes.procs if "gateway" in " ".join(map(str, p.args)))
    wait_for(lambda: len(psutil.Process(gateway.pid).children()) >= 2)
    keyed = {"authorization": "Bearer k1"}

    def served() -> bool:
        reply = httpx.get(f"{url}/v1/models", headers=keyed, timeout=5)
        return [m["id"] for m in reply.json()["data"]] == ["demo"]

    wait_for(served)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):  # whichever process takes the connection, it knows the fleet and the key
        with httpx.Client(timeout=10) as client:  # a new connection each time
            ok = client.post(f"{url}/v1/chat/completions", json=body, headers=keyed)
            assert ok.status_code == 200, ok.text
            refused = client.post(f"{url}/v1/chat/completions", json=body)
            assert refused.status_code == 401


def test_bad_requests_get_openai_errors_and_a_caller_leaving_mid_stream_frees_the_engine(
    processes: Processes, gateway: tuple[FleetProcs, str]
) -> None:
    fleet, url = gateway
    record = start(fleet, "demo", "--extra-args", "--stream-delay-ms 100")
    wait_for(lambda: models(url) == ["demo"])
    chat = f"{url}/v1/chat/completions"
    for body, message in (
        (b"{not json", "the body is not JSON"),
        (b'{"messages": []}', "`model` is required"),
        (b'["demo"]', "`model` is required"),
    ):
        reply = httpx.post(chat, content=body, timeout=5)
        assert reply.status_code == 400
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert message in reply.json()["error"]["message"]
    wrong_method = httpx.get(chat, timeout=5)
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")

    gateway = next(p for p in processes.procs if "gateway" in " ".join(map(str, p.args)))
    engine_port = int(str(record["url"]).rsplit(":", 1)[1])

    def to_engine() -> int:
        """The gateway's open connections to the engine."""
        return sum(
            bool(c.raddr) and c.raddr.port == engine_port and c.status == psutil.CONN_ESTABLISHED
            for c in psutil.Process(gateway.pid).net_connections("tcp")
        )

    words = " ".join(["word"] * 60)  # 60 words, 100 ms apart: a 6 s stream
    body = {"model": "demo", "messages": [{"role": "user", "content": words}], "stream": True}
    with httpx.Client(timeout=10) as client, client.stream("POST", chat, json=body) as stream:
        lines = stream.iter_lines()  # kept: a generator dropped closes the stream
        assert next(lines).startswith("data: ")
        wait_for(lambda: to_engine() == 1, timeout=3)
    # The caller is gone: the gateway drops its connection to the engine at once (vLLM aborts
    # a request whose connection closes), instead of relaying the rest to nobody and pooling it.
    wait_for(lambda: to_engine() == 0, timeout=3)
    for _ in range(10):  # and for good: the stream had 5 s to go
        assert to_engine() == 0
        time.sleep(0.05)


def test_an_engine_is_asked_for_by_its_served_name_and_its_env_values_stay_hidden(
    gateway: tuple[FleetProcs, str], sdk: Callable[..., openai.OpenAI]
) -> None:
    fleet, url = gateway
    secret = "hf_sekrit_0451"
    fleet.env["FROM_SHELL"] = "shell-value-77"  # --env NAME passes this shell's value
    record = start(
        fleet,
        "/weights/gemma-3-270m",
        "--served-model-name",
        "gemma",
        "--env",
        f"HF_TOKEN={secret}",
        "--env",
        "FROM_SHELL",
    )
    assert record["served_model_name"] == "gemma"
    assert record["env"] == {"FROM_SHELL": "***", "HF_TOKEN": "***"}
    environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={secret}".encode() in environ and b"FROM_SHELL=shell-value-77" in environ
    wait_for(lambda: models(url) == ["gemma"])
    client = sdk(f"{url}/v1")
    answer = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "[gemma] You said: hi"
    with pytest.raises(openai.NotFoundError):  # the weights' path is not what clients use
        client.chat.completions.create(
            model="/weights/gemma-3-270m", messages=[{"role": "user", "content": "hi"}]
        )
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)  # the next agent adopts it, record and all
    fleet.start_agent()
    fleet.wait_event("engine.adopted", str(record["engine_id"]), timeout=20)
    shown = [
        fleet.cli("llm", "engine", "list").stdout,
        fleet.cli("llm", "engine", "list", "--json").stdout,
        fleet.cli("llm", "events", "--json").stdout,
        httpx.get(f"{url}/v1/management/engines/{record['engine_id']}").text,
        fleet.procs.log("gateway"),
        fleet.procs.log("scheduler"),
        fleet.procs.log("agent-n1"),
    ]
    assert "engine.adopted" in shown[2] and "***" in shown[2] and "***" in shown[3]
    for text in shown:
        assert secret not in text and "shell-value-77" not in text
    refused = fleet.cli(
        "llm",
        "engine",
        "start",
        "m",
        "--backend",
        "fake",
        "--env",
        "LD_PRELOAD=/x.so",
        check=False,
    )
    assert (
        refused.returncode != 0 and "LD_PRELOAD cannot be given" in refused.stdout + refused.stderr
    )
