"""What the CLI says when something is wrong: one line, the user's text intact, a non-zero exit,
never a traceback."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import COMMANDS_ON_REDIS, sage
from tests.helpers.engines import marked_processes


def test_square_brackets_in_an_error_survive(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text('name: p\nengines:\n  - {name: "chat[b]", model: "m[x]"}\n')
    code, said = sage("preset", "apply", str(preset), "--dry-run")
    assert code == 1 and "engine 'chat[b]'" in said, said


def test_a_yaml_syntax_error_is_one_line_with_where(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text('name: p\nengines: [\n  {name: a, model: "[m]"\n')
    code, said = sage("preset", "apply", str(preset), "--dry-run")
    assert code == 1 and len(said.splitlines()) == 1, said
    assert said.startswith(f"error: {preset}: not valid YAML: line 4, column 1: "), said


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """Something that is not Redis, listening: an HTTP server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", COMMANDS_ON_REDIS.values(), ids=list(COMMANDS_ON_REDIS))
@pytest.mark.parametrize("scheme", ["redis", "http", "ftp"])
def test_a_redis_url_at_something_else_is_one_line(
    command: list[str], scheme: str, http_server: str, tmp_path: Path
) -> None:
    url = f"{scheme}://{http_server}/0"
    code, said = sage(*command, "--redis-url", url, state_dir=tmp_path)
    assert code == 1 and "Traceback" not in said, said
    last = said.splitlines()[-1]
    if scheme == "redis":
        assert "is not Redis" in last and "check" in last, said
    else:
        assert last.startswith(f"error: bad Redis URL '{url}'"), said


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
@pytest.mark.parametrize("command", [["up"], ["gateway", "run"]], ids=["up", "gateway"])
def test_a_port_out_of_range_is_refused_before_anything_starts(
    command: list[str], port: str
) -> None:
    code, said = sage(*command, "--port", port)
    assert code == 2 and "Invalid value for '--port'" in said and "Traceback" not in said, said


@pytest.mark.parametrize("command", [["up"], ["gateway", "run"]], ids=["up", "gateway"])
def test_a_port_already_taken_is_one_line_and_leaves_nothing(
    command: list[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        unreachable = ["--redis-url", "redis://127.0.0.1:1/0"] if command != ["up"] else []
        code, said = sage(*command, "--port", str(port), *unreachable, state_dir=tmp_path)
    assert code == 1 and "Traceback" not in said, said
    assert f"127.0.0.1:{port}" in said.splitlines()[-1] and "in use" in said, said
    assert time.monotonic() - started < 30
    assert marked_processes(tmp_path) == []
