"""Security end to end: every actor on a TLS-only Redis as an ACL user confined to the fleet's
keys; engines bound to the advertise address; no secret in any log, event or record."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis
from fastapi import FastAPI
from starlette.testclient import TestClient

from sage_mq.errors import ConfigError
from sage_mq.gateway import create_app
from sage_mq.gateway.auth import check_exposure
from sage_mq.gateway.inference import PATHS
from sage_mq.settings import Settings
from tests.helpers.batches import jsonl, wait_batch
from tests.helpers.engines import engine_processes
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import start, wait_for
from tests.helpers.servers import Processes, RedisServer, free_port
from tests.helpers.tls import make_certs

pytestmark = pytest.mark.fleet

ADMIN_PW = "redis-admin-pw-0451"
FLEET_PW = "redis-fleet-pw-7719"
API_KEY = "api-key-3322"
ADMIN_KEY = "admin-key-9087"
SECRETS = (ADMIN_PW, FLEET_PW, API_KEY, ADMIN_KEY)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that speaks TLS only, its ``default`` user behind ADMIN_PW."""
    server = RedisServer(free_port(), tmp_path, password=ADMIN_PW, tls=make_certs(tmp_path / "tls"))
    server.start()
    yield server
    server.kill()


def test_the_fleet_runs_on_tls_redis_as_an_acl_user_and_shows_no_secret(
    processes: Processes, tls_redis: RedisServer, tmp_path: Path, sdk: Callable[..., openai.OpenAI]
) -> None:
    fleet = FleetProcs(processes, tls_redis, tmp_path / "state")
    namespace = fleet.env["SAGE_MQ_NAMESPACE"]
    admin = redis.Redis.from_url(tls_redis.url, decode_responses=True)
    # The fleet's user reaches its own keys and rq's, nothing else, and no admin commands.
    rules = ["on", f">{FLEET_PW}", f"~{namespace}:*", "~rq:*", "&*", "+@all", "-@admin", "+role"]
    admin.execute_command("ACL", "SETUSER", "fleet", *rules)
    fleet.env["SAGE_MQ_REDIS_URL"] = tls_redis.url.replace(f":{ADMIN_PW}@", f"fleet:{FLEET_PW}@")
    fleet.env |= {"SAGE_MQ_API_KEY": API_KEY, "SAGE_MQ_ADMIN_KEY": ADMIN_KEY}
    # A key copied under another name, and a variable engines need (a hub token).
    fleet.env |= {"OPENAI_API_KEY": ADMIN_KEY, "HF_TOKEN": "hf-token-for-engines"}

    fleet.start_scheduler()
    fleet.start_agent()
    fleet.wait_node()
    port = free_port()
    processes.sage("gateway", ["llm", "gateway", "run", "--port", str(port)], fleet.env)
    processes.sage("worker", ["llm", "worker", "run"], fleet.env)
    chat = start(fleet, "demo")
    start(fleet, "mini-embed", "--engine-kind", "embedding")
    url = f"http://127.0.0.1:{port}"
    keyed = {"authorization": f"Bearer {API_KEY}"}
    wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 30)
    wait_for(lambda: set(models_with_key(url, keyed)) == {"demo", "mini-embed"})

    client = sdk(f"{url}/v1", API_KEY)
    answer = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "[demo] You said: hi"
    assert len(client.embeddings.create(model="mini-embed", input="x").data[0].embedding) == 384
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(20))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id, {"completed", "failed"})
    assert (done.status, done.request_counts.completed) == ("completed", 20)
    with pytest.raises(openai.AuthenticationError):
        sdk(f"{url}/v1", "wrong").models.list()

    # The engine listens on the node's advertise address only, not on every interface.
    listening = [
        c.laddr.ip
        for c in psutil.Process(int(chat["pid"])).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening == ["127.0.0.1"]
    # Engines get their own environment: none of the agent's secrets, under any name.
    for engine in engine_processes(tmp_path / "state"):
        environ = engine.environ()  # /proc/<pid>/environ
        assert environ["SAGE_TEST_MARK"] and environ["HF_TOKEN"] == "hf-token-for-engines"
        assert not [name for name in environ if name.startswith("SAGE_MQ_")]
        assert not [v for v in environ.values() for s in SECRETS if s in v], engine.cmdline()
    # Nobody was refused a key or a command: the fleet keeps to its namespace and rq's keys.
    assert admin.execute_command("ACL", "LOG") == []
    # Plain TCP is not served at all.
    with (
        redis.Redis(port=tls_redis.port, socket_timeout=2) as plain,
        pytest.raises(redis.ConnectionError),
    ):
        plain.ping()

    # An ACL that keeps the fleet from rq's keys: a clear answer, not a traceback.
    admin.execute_command("ACL", "SETUSER", "fleet", "resetkeys", f"~{namespace}:*")
    with pytest.raises(openai.APIStatusError) as refused:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.status_code == 503 and "~rq:*" in refused.value.message

    seen = _everything_written(tmp_path, admin, namespace)
    for secret in SECRETS:
        assert secret not in seen, f"{secret!r} leaked"
    admin.close()


def models_with_key(url: str, headers: dict[str, str]) -> list[str]:
    reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
    return [m["id"] for m in reply.json()["data"]] if reply.status_code == 200 else []


def _everything_written(tmp_path: Path, admin: redis.Redis, namespace: str) -> str:
    """Every log file of the test's processes and engines, and every value in the fleet's keys."""
    texts = [p.read_text(errors="replace") for p in tmp_path.rglob("*.log")]
    assert len(texts) >= 6  # scheduler, agent, gateway, worker, two engines
    for key in admin.scan_iter(f"{namespace}:*"):
        kind = admin.type(key)
        if kind == "hash":
            texts.append(json.dumps(admin.hgetall(key)))
        elif kind == "stream":
            texts.append(json.dumps(admin.xrange(key)))
        elif kind == "list":
            texts.append(json.dumps(admin.lrange(key, 0, -1)))
        elif kind == "string":
            texts.append(str(admin.get(key)))
    return "\n".join(texts)


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every route of the gateway: its OpenAPI document's, and the inference routes."""
    routes = {(path, "POST") for path in PATHS}  # served ahead of FastAPI: not in its document
    for path, operations in app.openapi()["paths"].items():
        routes |= {(re.sub(r"\{[^}]+\}", "x", path), method.upper()) for method in operations}
    assert len(routes) >= 24  # inference, batch, management, health, metrics
    return sorted(routes)


def test_every_route_but_health_wants_its_key(settings: Settings) -> None:
    app = create_app(settings, api_key=API_KEY, admin_key=ADMIN_KEY)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: only the gate runs

    def refused(path: str, method: str, key: str | None) -> bool:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return client.request(method, path, headers=headers).status_code == 401

    for path, method in _routes(app):
        if path == "/health":
            assert not refused(path, method, None), path
        elif path.startswith("/v1/management"):
            assert refused(path, method, None) and refused(path, method, API_KEY), path
            assert not refused(path, method, ADMIN_KEY), path
        else:
            assert refused(path, method, None) and refused(path, method, "wrong"), path
            assert not refused(path, method, API_KEY), path
            assert not refused(path, method, ADMIN_KEY), path


@pytest.mark.parametrize(("api_key", "admin_key"), [(API_KEY, None), (None, ADMIN_KEY)])
def test_one_key_configured_closes_every_route_a_key_is_for(
    settings: Settings, api_key: str | None, admin_key: str | None
) -> None:
    app = create_app(settings, api_key=api_key, admin_key=admin_key)
    client = TestClient(app, raise_server_exceptions=False)
    the_key = {"authorization": f"Bearer {api_key or admin_key}"}
    for path, method in _routes(app):
        bare = client.request(method, path).status_code
        keyed = client.request(method, path, headers=the_key).status_code
        if path == "/health":
            assert bare not in (401, 403), path
        elif path.startswith("/v1/management") and admin_key is None:
            assert bare == keyed == 403, path  # nothing opens it: there is no admin key
            message = client.request(method, path, headers=the_key).json()["error"]["message"]
            assert "--admin-key" in message
        else:
            assert bare == 401 and keyed != 401, path


@pytest.mark.parametrize(
    ("host", "admin_key", "insecure", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("::", None, False, True),
        ("10.0.0.5", None, False, True),
        ("gateway.internal", None, False, True),
        ("0.0.0.0", ADMIN_KEY, False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_no_gateway_serves_beyond_loopback_without_an_admin_key(
    host: str, admin_key: str | None, insecure: bool, refused: bool
) -> None:
    if refused:
        with pytest.raises(ConfigError, match=r"refusing to serve on .* without an admin key"):
            check_exposure(host, admin_key, insecure=insecure)
    else:
        check_exposure(host, admin_key, insecure=insecure)


@pytest.mark.parametrize("command", [["gateway", "run"], ["up"]])
def test_gateway_run_and_up_refuse_0_0_0_0_without_an_admin_key(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SAGE_MQ_API_KEY", "SAGE_MQ_ADMIN_KEY")}
    argv = [sys.executable, "-m", "sage_mq", "llm", *command, "--host", "0.0.0.0"]
    argv += ["--port", str(free_port())]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "without an admin key" in done.stderr, done.stderr
    env["SAGE_MQ_API_KEY"] = API_KEY  # an API key alone does not protect management
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "without an admin key" in done.stderr, done.stderr
