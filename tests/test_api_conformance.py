"""The gateway against its own OpenAPI document, with schemathesis, on a live fleet.

Every operation of the document (management, files and batches, the inference routes, health,
metrics) gets schema-valid and schema-violating requests, stateful sequences and unsupported
methods; every schemathesis check runs, the few expectations in
``tests/conformance/schemathesis.toml`` being behaviour the document states and a schema
cannot. The budget is bounded (examples per operation, a fixed seed); the number of cases run
is printed. Also: hand-made probes for the inputs that once made a 500.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import wait_for
from tests.helpers.servers import Processes, RedisServer, free_port

pytestmark = pytest.mark.fleet
CONFIG = Path(__file__).parent / "conformance" / "schemathesis.toml"
API, ADMIN = "conformance-api-key-55", "conformance-admin-key-77"
JSON = {"content-type": "application/json"}
EXAMPLES = 200
"""Examples per operation: about 5,000 cases, about a minute and a half on two cores."""


@pytest.fixture
def gateway(processes: Processes, redis_server: RedisServer, tmp_path: Path) -> str:
    """A scheduler, an agent (5 engine ports, models never fetched from a hub) and a gateway
    with both keys; its base URL."""
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.env["HF_HUB_OFFLINE"] = "1"  # an embedding engine of a made-up model fails at once
    low = int(fleet.port_range.split("-")[0])
    fleet.port_range = f"{low}-{low + 4}"  # a few engines at most, whatever is asked for
    # one try each: an engine of a made-up model fails once, not four times of a model load
    fleet.start_scheduler(
        "--backoff-base", "0.1", "--health-interval", "0.5", "--max-restart-attempts", "1"
    )
    fleet.start_agent()
    fleet.wait_node()
    port = free_port()
    env = fleet.env | {"SAGE_MQ_API_KEY": API, "SAGE_MQ_ADMIN_KEY": ADMIN}
    processes.sage("gateway", ["llm", "gateway", "run", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{url}/health"), 30)
    return url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing_with_every_check(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{gateway}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "12",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    output = done.stdout + done.stderr
    counted = re.search(r"(\d+) generated, (\d+) passed", output)
    with capsys.disabled():
        summary = counted.group(0) if counted else "no count"
        print(f"\nschemathesis ({EXAMPLES} examples per operation, every check): {summary}")
    assert done.returncode == 0, output[-12_000:]
    assert counted is not None and int(counted.group(1)) >= 1000, output[-3000:]
    assert "Tested: 26" in output, output[-3000:]  # every operation of the document


def test_inputs_that_once_made_a_500_get_a_4xx_that_says_why(gateway: str) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=gateway, headers=admin, timeout=30) as api:
        for path in ("/v1/files/file-x:lines", "/v1/files/file-x:lines/content"):
            answer = api.get(path)  # an id that names another key
            assert answer.status_code == 400 and "file_id" in answer.text, path
        answer = api.get("/v1/management/engines/e1:log")
        assert answer.status_code == 422 and "engine_id" in answer.text
        deep = "[" * 100_000 + "]" * 100_000
        for path in ("/v1/chat/completions", "/v1/management/engines", "/v1/batches"):
            answer = api.post(path, content=deep, headers=JSON)
            assert 400 <= answer.status_code < 500, (path, answer.status_code)
            assert answer.json()["error"]["message"], path
        lone = json.dumps({"model_id": "x", "engine_label": "\ud800"})  # a lone surrogate
        answer = api.post("/v1/management/engines", content=lone, headers=JSON)
        assert answer.status_code == 422 and "engine_label" in answer.text
        wait_zero = {"model_id": "x", "backend": "fake", "wait": 0}
        assert api.post("/v1/management/engines", json=wait_zero).status_code == 422
        not_allowed = api.put("/v1/files")
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET, POST"
