"""Real servers and processes for tests: redis-server on a free port, child process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from sage_mq.errors import ConfigError
from sage_mq.local_redis import bundled_server, redis_executable
from tests.helpers.tls import TlsFiles
from tests.helpers.tlsfront import TlsFront

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process of our own (never the machine's shared one)."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    password: str | None = None
    username: str | None = None
    """An ACL user of ``extra``'s to connect as (with ``password``), instead of ``default``."""
    tls: TlsFiles | None = None
    """Serve TLS only (``rediss://``), with these certificates."""
    front: TlsFront | None = None
    """The TLS front of a server built without TLS (the bundled Valkey)."""

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    def start(self) -> None:
        try:  # as `sage llm up` chooses: redis-server 7+ from PATH, else the bundled Valkey
            exe = redis_executable()
        except ConfigError as exc:
            pytest.fail(str(exc))
        served = self.port
        if self.tls is not None and exe == bundled_server():  # built without TLS: a front
            served = free_port()
            self.front = TlsFront(self.port, served, self.tls)
        argv = [
            exe,
            "--port",
            str(served),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis-server.log"),  # appended to across restarts
            *self.extra,
        ]
        if self.password and not self.username:
            argv += ["--requirepass", self.password]
        if self.tls is not None and self.front is None:
            argv[argv.index("--port") + 1] = "0"
            argv += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            argv += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            argv += ["--tls-ca-cert-file", str(self.tls.ca)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.front is not None:
            self.front.start()
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing (a hung host)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.front is not None:
            self.front.stop()
            self.front = None


class Processes:
    """Real child processes of a test, each in its own group, killed at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
        log.close()
        self.procs.append(proc)
        return proc

    def sage(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", "sage_mq", *args], env)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


class OldRedis:
    """A TCP server that answers ``HELLO`` and ``PING`` as a Redis of ``version`` would (and
    refuses every other command), to show what a fleet does on a server too old for it."""

    def __init__(self, version: str = "6.2.6") -> None:
        self.version = version
        self.port = free_port()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> OldRedis:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        version = self.version

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while (line := self.rfile.readline()).startswith(b"*"):
                    args = []
                    for _ in range(int(line[1:])):
                        size = int(self.rfile.readline()[1:])
                        args.append(self.rfile.read(size + 2)[:-2].decode())
                    self.wfile.write(_answer(args, version))

        return Handler


def _answer(args: list[str], version: str) -> bytes:
    if args and args[0].upper() == "HELLO":  # in the protocol asked for (RESP3: a map)
        resp3 = args[1:2] == ["3"]
        fields = ["server", "redis", "version", version, "proto", "3" if resp3 else "2"]
        head = f"%{len(fields) // 2}" if resp3 else f"*{len(fields)}"
        return f"{head}\r\n".encode() + b"".join(
            (f":{f}" if f in "23" else f"${len(f)}\r\n{f}").encode() + b"\r\n" for f in fields
        )
    if args and args[0].upper() == "PING":
        return b"+PONG\r\n"
    return b"-ERR unknown command\r\n"
