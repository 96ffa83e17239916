"""EngineLifecycleManager: the engine processes of one node, from spawn to reaped.

It persists each engine's pid and process start time under the node's state directory, so an
agent that restarts finds its engines again (and never mistakes a reused pid for one of them).
It reports exits it did not ask for through ``on_exit``; it makes no policy decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sage_mq.agent import logs, processes
from sage_mq.engines.backends import build_argv, build_env, health_paths
from sage_mq.errors import LaunchError
from sage_mq.messages import LaunchEngine

log = logging.getLogger(__name__)


@dataclass
class ManagedEngine:
    """One engine process this node runs (or ran until ``exit_code`` was set)."""

    engine_id: str
    generation: int
    pid: int
    create_time: float
    argv: list[str]
    kind: str
    backend: str
    host: str
    port: int
    log_path: str
    started_at: float = field(default_factory=time.time)
    record: dict[str, Any] = field(default_factory=dict)
    """The scheduler's record for this launch, handed back when the engine is adopted."""
    mark: str = ""
    """What every process of this engine carries in ``SAGE_ENGINE`` (see processes.marked)."""
    stopping: bool = field(default=False, compare=False)
    adopted: bool = field(default=False, compare=False)
    exited: asyncio.Future[int | None] | None = field(default=None, compare=False, repr=False)
    child: bool = field(default=False, compare=False)
    """Spawned by this manager (so its exit code can be read), not adopted."""
    _cancel_watch: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        """Base URL of the engine's OpenAI-compatible server."""
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """True until the exit watcher has seen the process end."""
        return self.exited is not None and not self.exited.done()

    def state(self) -> dict[str, Any]:
        """What is persisted to find the engine again after an agent restart."""
        return {name: getattr(self, name) for name in _PERSISTED}


_PERSISTED = (
    "engine_id",
    "generation",
    "pid",
    "create_time",
    "argv",
    "kind",
    "backend",
    "host",
    "port",
    "log_path",
    "started_at",
    "record",
    "mark",
)

ExitHandler = Callable[[ManagedEngine, int | None], Coroutine[Any, Any, None]]


class EngineLifecycleManager:
    """Spawns, watches, probes and stops the engine processes of one node."""

    def __init__(
        self,
        node_dir: Path,
        *,
        on_exit: ExitHandler | None = None,
        base_env: Mapping[str, str] | None = None,
        stop_grace_s: float = 10.0,
        log_backups: int = 3,
    ) -> None:
        self.state_dir = node_dir / "engines"
        self.log_dir = node_dir / "logs"
        self.on_exit = on_exit
        self.base_env = dict(base_env or {})
        self.stop_grace_s = stop_grace_s
        self.log_backups = log_backups
        self.engines: dict[str, ManagedEngine] = {}
        self.node_id = node_dir.name
        self._http: httpx.AsyncClient | None = None
        self._exit_tasks: set[asyncio.Task[None]] = set()
        self._remains: dict[str, asyncio.Task[None]] = {}
        """Per engine: the killing of what its exited main process left behind."""

    # -- spawn and stop ------------------------------------------------------------------
    async def launch(
        self,
        cmd: LaunchEngine,
        executables: Mapping[str, str] | None = None,
        *,
        python: str | None = None,
    ) -> ManagedEngine:
        """Spawn the engine described by ``cmd`` and start watching it (``executables``: the
        paths the ``command`` backend's allowed executables resolve to; ``python``: the
        interpreter its backend runs in, the agent's own if None)."""
        await self.settle(cmd.engine_id)  # none of an earlier generation may be left
        argv = build_argv(cmd, python, executables)
        log_path = self.log_dir / f"{cmd.engine_id}.log"
        logs.rotate(log_path, self.log_backups)
        mark = f"{self.node_id}/{cmd.engine_id}/{cmd.generation}"
        env = build_env(cmd, self.base_env) | {processes.ENGINE_MARK: mark}
        pid = processes.spawn(argv, env, log_path)
        engine = ManagedEngine(
            engine_id=cmd.engine_id,
            generation=cmd.generation,
            pid=pid,
            create_time=processes.create_time(pid) or time.time(),
            argv=argv,
            kind=cmd.kind,
            backend=cmd.backend,
            host=cmd.host,
            port=cmd.port,
            log_path=str(log_path),
            record=dict(cmd.record or {}),
            mark=mark,
            child=True,
        )
        self._track(engine)
        log.info(
            "spawned %s (generation %d) pid %d: %s",
            cmd.engine_id,
            cmd.generation,
            pid,
            " ".join(argv),
        )
        return engine

    async def stop(self, engine_id: str, grace_s: float | None = None) -> int | None:
        """SIGTERM the engine's group, wait ``grace_s``, then SIGKILL; gone already is success."""
        engine = self.engines.get(engine_id)
        if engine is None:
            return None
        engine.stopping = True
        grace = self.stop_grace_s if grace_s is None else grace_s
        if engine.alive and self._is_ours(engine):
            processes.signal_group(engine.pid, signal.SIGTERM)
        returncode = await self._wait_exit(engine, grace)
        if engine.alive:
            log.warning("%s ignored SIGTERM for %.1fs; sending SIGKILL", engine_id, grace)
            processes.signal_group(engine.pid, signal.SIGKILL)
            returncode = await self._wait_exit(engine, 5.0)
        await self._kill_remains(engine)
        self._forget(engine)
        return returncode

    async def settle(self, engine_id: str) -> None:
        """Wait until nothing is left of the engine's earlier processes (see ``_exited``)."""
        remains = self._remains.pop(engine_id, None)
        if remains is not None:
            await remains

    async def _kill_remains(self, engine: ManagedEngine, *, group: bool = True) -> None:
        """Everything of the engine but its main process, killed: its group (unless the group
        id may be someone else's by now) and whatever carries its mark. Said in the log."""
        try:
            killed = await processes.kill_remains(
                engine.pid if group else None, engine.mark or f"{self.node_id}/?"
            )
        except LaunchError as exc:
            log.error("%s: %s", engine.engine_id, exc)
            return
        if killed:
            log.warning("%s: killed what its main process left: %s", engine.engine_id, killed)

    async def _wait_exit(self, engine: ManagedEngine, timeout: float) -> int | None:
        assert engine.exited is not None
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(engine.exited), timeout)
        return None

    def _is_ours(self, engine: ManagedEngine) -> bool:
        return engine.child or processes.same_process(engine.pid, engine.create_time)

    # -- watching ------------------------------------------------------------------------
    def _track(self, engine: ManagedEngine) -> None:
        engine.exited = asyncio.get_running_loop().create_future()
        self.engines[engine.engine_id] = engine
        self._persist(engine)
        engine._cancel_watch = processes.watch_exit(engine.pid, lambda: self._exited(engine))

    def _exited(self, engine: ManagedEngine) -> None:
        returncode = processes.reap(engine.pid) if engine.child else None
        assert engine.exited is not None
        if not engine.exited.done():
            engine.exited.set_result(returncode)
        if engine.stopping:
            return
        self._forget(engine)
        log.warning(
            "%s (pid %d) %s",
            engine.engine_id,
            engine.pid,
            processes.describe_returncode(returncode),
        )
        self._start_cleaning(engine, group=True)
        if self.on_exit is not None:
            task = asyncio.get_running_loop().create_task(self.on_exit(engine, returncode))
            self._exit_tasks.add(task)
            task.add_done_callback(self._exit_tasks.discard)

    def _start_cleaning(self, engine: ManagedEngine, *, group: bool) -> None:
        """Kill what the engine left, in the background (its exit is reported at once); a
        launch of the engine waits for it (:meth:`settle`)."""
        loop = asyncio.get_running_loop()
        self._remains[engine.engine_id] = loop.create_task(self._kill_remains(engine, group=group))

    def _forget(self, engine: ManagedEngine) -> None:
        if self.engines.get(engine.engine_id) is engine:
            del self.engines[engine.engine_id]
            self._state_file(engine.engine_id).unlink(missing_ok=True)
        if engine._cancel_watch is not None:
            engine._cancel_watch()

    # -- persistence and recovery --------------------------------------------------------
    def _state_file(self, engine_id: str) -> Path:
        return self.state_dir / f"{engine_id}.json"

    def _persist(self, engine: ManagedEngine) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_file(engine.engine_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(engine.state()))
        tmp.replace(path)

    def recover(self) -> tuple[list[ManagedEngine], list[ManagedEngine]]:
        """Find engines from a previous agent run: (still running → adopted, gone)."""
        adopted: list[ManagedEngine] = []
        gone: list[ManagedEngine] = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                engine = ManagedEngine(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.error("unreadable engine state %s (%s); moving it aside", path, exc)
                path.replace(path.with_suffix(".bad"))
                continue
            if processes.same_process(engine.pid, engine.create_time):
                engine.adopted = True
                self._track(engine)
                adopted.append(engine)
            else:
                path.unlink(missing_ok=True)
                gone.append(engine)
                self._start_cleaning(engine, group=False)  # its pid may be another's now
        return adopted, gone

    # -- health --------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False)
        return self._http

    async def health_check(self, engine_id: str, timeout: float = 5.0) -> bool:
        """True if the engine answers its health endpoint (see ``backends.health_paths``)."""
        engine = self.engines.get(engine_id)
        if engine is None or not engine.alive:
            return False
        for path in health_paths(engine.backend, engine.kind):
            try:
                response = await self._client().get(engine.url + path, timeout=timeout)
            except httpx.HTTPError:
                return False
            if response.status_code == 200:
                return True
        return False

    async def health_check_all(self, timeout: float = 5.0) -> dict[str, bool]:
        """Probe every engine concurrently."""
        ids = list(self.engines)
        results = await asyncio.gather(*(self.health_check(i, timeout) for i in ids))
        return dict(zip(ids, results, strict=True))

    async def wait_ready(self, engine_id: str, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Poll until the engine is healthy (True), exits or the time is up (False). Healthy
        means its own process answers: an answer from whatever else holds its port (a stray
        server, an older copy) does not count."""
        deadline = time.monotonic() + timeout_s
        delay = poll_s
        warned = False
        while time.monotonic() < deadline:
            engine = self.engines.get(engine_id)
            if engine is None or not engine.alive:
                return False
            if await self.health_check(engine_id, timeout=min(2.0, max(0.2, delay * 4))):
                if await self._answers_itself(engine):
                    return True
                if not warned:
                    warned = True
                    log.warning(
                        "%s: port %d answers, but not from the engine's processes: waiting "
                        "for its own", engine_id, engine.port,
                    )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return False

    async def _answers_itself(self, engine: ManagedEngine) -> bool:
        if not engine.mark:  # launched by an agent from before marks: nothing to tell by
            return True
        return await asyncio.to_thread(processes.listening, engine.mark, engine.port)

    def tail_log(self, engine_id: str, lines: int = 20) -> list[str]:
        """The last lines of an engine's log on this node."""
        return logs.tail(self.log_dir / f"{engine_id}.log", lines)

    async def close(self) -> None:
        """Release the HTTP client and stop watching; engine processes keep running (what
        exited engines left behind is killed first)."""
        await asyncio.gather(*self._remains.values(), return_exceptions=True)
        for engine in list(self.engines.values()):
            if engine._cancel_watch is not None:
                engine._cancel_watch()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
