"""The fleet runs on Redis 7 or newer (or Valkey): the server ``up`` runs is one, and every actor
refuses an older one in one line."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sage_mq import local_redis
from sage_mq.connection import check_server, server_problem
from sage_mq.errors import ConfigError
from sage_mq.local_redis import LocalRedis, bundled_server, redis_executable
from tests.helpers.cli import ACTORS, sage
from tests.helpers.servers import ROOT, OldRedis, RedisServer


def hello(server: str, version: str) -> list[str]:
    return ["server", server, "version", version, "proto", "2", "mode", "standalone"]


def test_redis_7_and_valkey_pass_and_older_servers_are_named_with_their_version() -> None:
    assert server_problem(hello("redis", "7.0.15"), "h:1") is None
    assert server_problem(hello("valkey", "8.1.8"), "h:1") is None
    problem = server_problem(hello("redis", "6.2.6"), "h:1")
    assert problem is not None and problem.startswith("the redis server at h:1 is version 6.2.6;")
    assert "needs Redis 7.0 or newer" in problem
    assert "version older than 6.0" in str(server_problem(None, "h:1"))  # no HELLO at all


async def test_the_check_passes_on_real_servers(redis_server: RedisServer) -> None:
    local = LocalRedis()
    url = local.start()
    try:
        for where in (redis_server.url, url):
            client = aioredis.Redis.from_url(where)
            await check_server(client)
            await client.aclose()
    finally:
        local.stop()


async def test_the_check_refuses_a_6_2_server_naming_it() -> None:
    with OldRedis("6.2.6") as old:
        client = aioredis.Redis.from_url(old.url)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{old.port} is version 6.2.6"):
            await check_server(client)
        await client.aclose()


@pytest.mark.parametrize("command", ACTORS.values(), ids=list(ACTORS))
def test_every_actor_refuses_a_6_2_server_in_one_line(command: list[str], tmp_path: Path) -> None:
    with OldRedis("6.2.6") as old:
        code, said = sage(*command, "--redis-url", old.url, state_dir=tmp_path)
    assert code == 1, said
    assert "Traceback" not in said, said
    assert "is version 6.2.6; sage-mq needs Redis 7.0 or newer" in said.splitlines()[-1], said


def test_up_runs_the_bundled_server_when_path_has_none_or_an_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = bundled_server()
    assert bundled is not None and bundled.endswith("valkey-server")  # a dependency here
    monkeypatch.setenv("PATH", str(tmp_path))
    assert redis_executable() == bundled  # none on PATH
    old = tmp_path / "redis-server"
    old.write_text("#!/bin/sh\necho 'Redis server v=6.2.6 sha=00000000:0 malloc=libc bits=64'\n")
    old.chmod(0o755)
    assert local_redis.executable_version(str(old)) == (6, 2)
    assert redis_executable() == bundled  # an old one is passed over, and left alone


def test_without_a_server_anywhere_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(local_redis, "bundled_server", lambda: None)
    with pytest.raises(ConfigError, match=r"install Redis 7.0 or newer \(apt-get install"):
        redis_executable()


@pytest.mark.fleet
@pytest.mark.timeout(660)
def test_the_suite_runs_on_the_bundled_server_where_path_has_no_redis(tmp_path: Path) -> None:
    """A machine without redis-server: the bus, the store, the fleet, a killed and restarted
    Redis, Sentinel failovers and the TLS + ACL fleet run on the bundled Valkey (behind the test
    fixtures' TLS front), as they do on Redis in the rest of the run."""
    python_only = str(Path(sys.executable).parent)
    assert shutil.which("redis-server", path=python_only) is None
    tests = [
        "tests/test_bus.py",
        "tests/test_store.py",
        "tests/test_fleet.py",
        "tests/test_redis_loss.py",
        "tests/test_sentinel.py",
        "tests/test_security.py::test_the_fleet_runs_on_tls_redis_as_an_acl_user_and_shows_no_secret",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_MQ_")}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    argv += ["--basetemp", str(tmp_path / "inner")]  # never the outer run's temp directories
    inner = subprocess.Popen(  # a group of its own: its servers go with it, whatever happens
        argv,
        env=env | {"PATH": python_only},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        said, _ = inner.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inner.pid, signal.SIGKILL)
        inner.wait()
    assert inner.returncode == 0, said[-6000:]
    assert re.search(r"\b\d{2,} passed\b", said) and " skipped" not in said, said[-3000:]
