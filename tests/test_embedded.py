"""All-in-one: `sage llm up` and create(embedded=True) start a whole fleet and leave nothing."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from sage_mq import UnifiedInferenceClient
from tests.helpers.engines import engine_processes, marked_env
from tests.helpers.servers import ROOT, free_port

pytestmark = pytest.mark.fleet
API_KEY, ADMIN_KEY = "up-api-key-7781", "up-admin-key-1266"


def batch_workers(marker: Path) -> list[psutil.Process]:
    """Live `sage llm worker run` processes started under this test's marker."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if "worker" in cmdline and proc.environ().get("SAGE_TEST_MARK") == str(marker):
                found.append(proc)
    return found


def test_sage_llm_up_serves_the_demo_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    port = free_port()
    env = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path))
    env |= {"SAGE_MQ_API_KEY": API_KEY, "SAGE_MQ_ADMIN_KEY": ADMIN_KEY}  # up honours them
    env.pop("SAGE_MQ_REDIS_URL", None)
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage_mq", "llm", "up", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C at a terminal reaches the whole group: so do we
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        text = out.read_text()
        assert f"http://127.0.0.1:{port}/v1" in text and "demo-chat" in text
        assert "inference wants a key; management: admin key" in text
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0).models.list()
        for key, status in ((None, 401), (API_KEY, 401), (ADMIN_KEY, 200)):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            got = httpx.get(f"{base}/v1/management/engines", headers=headers, timeout=10)
            assert got.status_code == status, (key, got.text)
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        answer = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content == "[demo-chat] You said: hello"
        assert len(engine_processes(tmp_path)) == 2
        assert len(batch_workers(tmp_path)) == 1
        found = re.search(r"Redis\s+redis://127\.0\.0\.1:(\d+)", text)
        assert found is not None
        redis_port = int(found.group(1))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "nothing is left" in out.read_text()
    assert engine_processes(tmp_path) == [] and batch_workers(tmp_path) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()


def test_an_embedded_client_runs_its_own_fleet_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGE_MQ_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SAGE_TEST_MARK", str(tmp_path))  # our engines, found by marker
    with UnifiedInferenceClient.create(embedded=True, default_llm_model="demo-chat") as client:
        assert client.models() == ["demo-chat", "demo-embed"]
        assert client.chat("hi") == "[demo-chat] You said: hi"
        assert len(client.embed(["a", "b"], model="demo-embed")) == 2
        assert len(engine_processes(tmp_path)) == 2
        job = client.submit_chat("queued")  # the embedded fleet has a batch worker too
        assert job.result(timeout=60) == "[demo-chat] You said: queued"
    assert engine_processes(tmp_path) == [] and batch_workers(tmp_path) == []
