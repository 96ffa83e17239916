"""The gateway's management REST API, API keys and metrics, with real processes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.helpers.gateway import run_gateway
from tests.helpers.runtimes import venv_with
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet
API, ADMIN = "inference-key-1b2c", "admin-key-9f8e"


def test_keys_guard_their_routes_and_are_never_logged(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    _fleet, url = run_gateway(
        processes, redis_server, tmp_path, "--api-key", API, "--admin-key", ADMIN
    )

    def get(path: str, key: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{url}{path}", headers=headers, timeout=10)

    refused = get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert get("/v1/models", "wrong").status_code == 401
    assert get("/v1/models", API).status_code == 200
    assert get("/v1/models", ADMIN).status_code == 200  # the admin key opens inference too
    assert get("/v1/management/engines").status_code == 401
    assert get("/v1/management/engines", API).status_code == 401
    assert get("/v1/management/engines", ADMIN).json() == []
    assert get("/health").status_code == 200
    assert get("/metrics").status_code == 401 and get("/metrics", API).status_code == 200
    log = processes.log("gateway")
    assert API not in log and ADMIN not in log


def test_engines_nodes_gpus_status_and_presets_over_rest(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    _fleet, url = run_gateway(processes, redis_server, tmp_path)
    with httpx.Client(base_url=f"{url}/v1/management", timeout=60) as api:
        bad = api.post("/engines", json={"model_id": "demo", "tensor_parallel_size": 0})
        assert bad.status_code == 422
        assert "field 'tensor_parallel_size'" in bad.json()["error"]["message"]
        typo = api.post("/engines", json={"model_id": "demo", "use_gpus": False})
        assert typo.status_code == 422 and "use_gpus" in typo.json()["error"]["message"]
        body = {"model_id": "demo", "backend": "fake", "use_gpu": False, "wait": True}
        started = api.post("/engines", json=body)
        assert started.status_code == 202 and started.json()["state"] == "RUNNING"
        engine_id = started.json()["engine_id"]
        assert api.get(f"/engines/{engine_id}").json()["url"] == started.json()["url"]
        missing = api.get("/engines/nope")
        assert (
            missing.status_code == 404 and "no engine 'nope'" in missing.json()["error"]["message"]
        )
        restarted = api.post(f"/engines/{engine_id}/restart", params={"wait": True}).json()
        assert restarted["generation"] == 2 and restarted["state"] == "RUNNING"
        assert [n["node_id"] for n in api.get("/nodes").json()] == ["n1"]
        gpus = api.get("/gpus").json()
        assert len(gpus) == 2 and all(g["engines"] == [] and g["fake"] for g in gpus)  # CPU engine
        assert api.get("/status").json()["engines"]["by_state"] == {"RUNNING": 1}
        applied = api.post("/presets/apply", json={"name": "demo"})
        assert [r["engine_id"] for r in applied.json()] == ["demo-chat", "demo-embed"]
        assert api.post("/presets/apply", json={"name": "../etc/passwd"}).status_code == 422
        with_file = api.post("/presets/apply", json={"name": "pyproject.toml"})  # in its cwd
        assert with_file.status_code == 404 and "build-system" not in with_file.text
        assert "no built-in preset" in with_file.json()["error"]["message"]
        broken = api.post(
            "/presets/apply", json={"preset": {"version": 1, "name": "x", "engines": [{}]}}
        )
        assert (
            broken.status_code == 400
            and "engines[0], field 'name'" in broken.json()["error"]["message"]
        )
        stopped = api.delete(f"/engines/{engine_id}", params={"wait": True})
        assert stopped.status_code == 202 and stopped.json()["state"] == "STOPPED"
        chat = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10).status_code == 200
        for made_up in ("gpt-x", "gpt-y"):  # the caller's free text makes no label of its own
            lost = httpx.post(f"{url}/v1/chat/completions", json=chat | {"model": made_up})
            assert lost.status_code == 404
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'model="(unknown)",route="/v1/chat/completions",status="404"} 2.0' in metrics
        assert "gpt-x" not in metrics
        assert "sage_batch_queue_depth 0.0" in metrics and "sage_batches_active 0.0" in metrics
        counted = 'model="demo-chat",route="/v1/chat/completions",status="200"} 1.0'
        assert "sage_gateway_requests_total{" + counted in metrics
        assert 'sage_engines{state="RUNNING"} 2.0' in metrics
        assert 'sage_engine_restarts{engine_id="' + engine_id + '"} 1.0' in metrics


def test_a_request_never_chooses_what_a_node_runs(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    vllm = venv_with(tmp_path, ("vllm", "0.32.0"))  # a node with vLLM: its flags are judged
    _fleet, url = run_gateway(
        processes,
        redis_server,
        tmp_path,
        "--admin-key",
        ADMIN,
        agent_args=("--runtime", f"vllm={vllm}"),
    )
    marker = tmp_path / "pwned"
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=f"{url}/v1/management", headers=admin, timeout=60) as api:
        shell = ["/bin/sh", "-c", f"touch {marker}; env"]
        body = {"model_id": "x", "backend": "command", "extra_args": shell, "wait": True}
        refused = api.post("/engines", json=body)  # answered at once, not after 30 minutes
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert "--allow-command /bin/sh" in message and ADMIN not in message
        remote = {"model_id": "x", "extra_args": ["--trust-remote-code"], "wait": True}
        refused = api.post("/engines", json=remote)
        assert refused.status_code == 409 and "--allow-engine-flag" in refused.text
        far = {"model_id": "x", "backend": "fake", "port": 22, "use_gpu": False, "wait": True}
        refused = api.post("/engines", json=far)
        assert refused.status_code == 409 and "outside its engine port range" in refused.text
        for bad_args, status in ((["ok\u0000"], 422), ([""], 400), (["\ud800"], 422)):
            body = {"model_id": "x", "backend": "command", "extra_args": bad_args}
            raw = json.dumps(body)  # ASCII, escapes included: a lone surrogate as JSON sends it
            answer = api.post("/engines", content=raw, headers={"content-type": "application/json"})
            assert answer.status_code == status, bad_args  # refused before anything is queued
            assert "extra_args" in answer.text or "executable" in answer.text, answer.text
        states = {r["engine_id"]: r["state"] for r in api.get("/engines").json()}
        assert set(states.values()) == {"FAILED"}  # no port, no GPU held, none STARTING
    assert not marker.exists()
