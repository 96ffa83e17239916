"""What a gateway takes, bounded before it is buffered; connections that crawl are closed; one
upload never stalls the event loop that a node agent's heartbeat shares (real processes)."""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from sage_mq.keys import Keys
from sage_mq.wire import decode
from tests.helpers.batches import jsonl
from tests.helpers.gateway import run_gateway, wait_for
from tests.helpers.servers import Processes, RedisServer
from tests.helpers.up import running_up

pytestmark = pytest.mark.fleet
MIB = 1024 * 1024
BATCH = {"purpose": "batch"}
PROBE = """
import signal, sys, time, httpx
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
with httpx.Client(timeout=10) as client, open(sys.argv[2], "w") as out:
    while running:
        started = time.monotonic()
        client.get(sys.argv[1]).raise_for_status()
        out.write(f"{time.monotonic() - started}\\n")
        out.flush()
        time.sleep(0.01)
"""
"""/health, probed from a process of its own (a thread here would time this test's own work)."""


def _raw(port: int, request: bytes, *, timeout: float = 10) -> bytes:
    """Send ``request`` as it is; what comes back before the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
    return answer


def _gateway_pid(processes: Processes) -> int:
    (proc,) = [p for p in processes.procs if "gateway" in " ".join(map(str, p.args))]
    return proc.pid


def test_bodies_over_the_limit_are_refused_before_they_are_buffered(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    _fleet, url = run_gateway(processes, redis_server, tmp_path, "--max-body-mib", "1")
    port = int(url.rsplit(":", 1)[1])
    gateway = psutil.Process(_gateway_pid(processes))
    before = gateway.memory_info().rss
    declared = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 524288000\r\n\r\n"  # 500 MB announced; none of it sent
    )
    answer = _raw(port, declared)
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in answer
    management = declared.replace(b"/v1/chat/completions", b"/v1/management/engines")
    answer = _raw(port, management)
    assert answer.startswith(b"HTTP/1.1 413") and b'"type":"TooLarge"' in answer
    upload = declared.replace(b"/v1/chat/completions", b"/v1/files").replace(
        b"524288000",
        b"1073741824",  # a 1 GB upload: over the largest batch file
    )
    answer = _raw(port, upload)
    assert answer.startswith(b"HTTP/1.1 413") and b"an upload here is at most" in answer

    chunk = b"x" * 65536  # no Content-Length: counted as it comes, 64 MiB of it
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"10000\r\n" + chunk + b"\r\n") * 1024
        + b"0\r\n\r\n"
    )
    answer = _raw(port, chunked, timeout=30)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    grown = gateway.memory_info().rss - before
    assert grown < 40 * MIB, f"the gateway grew by {grown / MIB:.0f} MiB"
    small = {"model": "nope", "messages": [{"role": "user", "content": "x" * 1000}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=small).status_code == 404


def test_an_upload_that_cannot_make_a_batch_is_refused_and_leaves_nothing(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet, url = run_gateway(processes, redis_server, tmp_path)
    files = {"file": ("big.jsonl", io.BytesIO(jsonl(50_001)))}
    refused = httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, files=files, timeout=60)
    assert refused.status_code == 400
    assert "more than 50000 requests" in refused.json()["error"]["message"]
    blank = {"file": ("blank.jsonl", io.BytesIO(b"\n" * 100_001))}
    refused = httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, files=blank, timeout=60)
    assert refused.status_code == 400 and "more than 100000 lines" in refused.text
    latin = {"file": ("latin.jsonl", io.BytesIO(b'{"custom_id": "caf\xe9"}\n'))}
    refused = httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, files=latin, timeout=60)
    assert refused.status_code == 400 and "not UTF-8" in refused.text
    client = redis.Redis.from_url(fleet.env["SAGE_MQ_REDIS_URL"], decode_responses=True)
    namespace = fleet.env["SAGE_MQ_NAMESPACE"]
    assert list(client.scan_iter(f"{namespace}:file:*")) == []  # no half-stored file
    kept = {"file": ("ok.jsonl", io.BytesIO(jsonl(3)))}
    stored = httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, files=kept, timeout=60)
    file_id = stored.json()["id"]
    assert client.llen(Keys(namespace).file_lines(file_id)) == 3
    assert client.ttl(Keys(namespace).file_lines(file_id)) == -1  # kept, not expiring
    client.close()


def test_connections_that_crawl_are_closed_and_slow_answers_are_not(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet, url = run_gateway(
        processes, redis_server, tmp_path, "--header-timeout", "1", "--body-timeout", "1"
    )
    fleet.json("llm", "engine", "start", "slow", "--backend", "fake", "--no-gpu", "--wait",
               "--extra-args", "--latency-ms 2500")  # fmt: skip
    wait_for(lambda: "slow" in httpx.get(f"{url}/v1/models").text)
    port = int(url.rsplit(":", 1)[1])
    crawling = []
    for _ in range(200):  # slow loris: headers that never end
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        crawling.append(sock)
    paused = socket.create_connection(("127.0.0.1", port))  # a body that stops coming
    paused.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    chat = {"model": "slow", "messages": [{"role": "user", "content": "take your time"}]}
    started = time.monotonic()
    answered = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert answered.status_code == 200 and time.monotonic() - started > 2.4  # not cut short
    for sock in [*crawling, paused]:
        sock.settimeout(5)
        assert b"408 Request Timeout" in sock.recv(4096)  # said why, then closed
        assert sock.recv(4096) == b""
        sock.close()
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


@pytest.mark.timeout(300)
def test_a_huge_upload_never_stalls_the_loop_sage_llm_up_shares_with_its_agent(
    tmp_path: Path,
) -> None:
    huge = b"".join(b'{"custom_id":"%07d"}\n' % i for i in range(2_000_000))  # 46 MB
    full = jsonl(50_000)
    record = tmp_path / "latencies"
    with running_up(tmp_path) as up:
        prober = subprocess.Popen([sys.executable, "-c", PROBE, f"{up.base}/health", str(record)])
        try:
            wait_for(lambda: record.exists() and record.stat().st_size > 0)
            files = {"file": ("huge.jsonl", io.BytesIO(huge))}
            refused = httpx.post(f"{up.base}/v1/files", data=BATCH, files=files, timeout=120)
            assert refused.status_code == 400 and "more than 50000 requests" in refused.text
            files = {"file": ("full.jsonl", io.BytesIO(full))}
            uploaded = httpx.post(f"{up.base}/v1/files", data=BATCH, files=files, timeout=120)
            body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"}
            created = httpx.post(f"{up.base}/v1/batches", json=body, timeout=120)  # 50,000 checked
            assert created.status_code == 200 and created.json()["status"] == "in_progress"
            httpx.post(f"{up.base}/v1/batches/{created.json()['id']}/cancel", timeout=60)
        finally:
            prober.send_signal(signal.SIGTERM)
            prober.wait(10)
        client = redis.Redis.from_url(up.redis_url, decode_responses=True)
        seen = [decode(fields).type for _id, fields in client.xrange(Keys("sage").events)]
        client.close()
        up.ctrl_c()
    latencies = sorted(float(x) for x in record.read_text().split())
    p99 = latencies[int(len(latencies) * 0.99)]
    worst = f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    print(f"\n/health while uploading and checking: {len(latencies)} probes, {worst}")
    assert len(latencies) > 50 and p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms"
    assert "node.lost" not in seen and seen.count("node.joined") == 1
