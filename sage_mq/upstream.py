"""An HTTP/1.1 client to engines, for the gateway and the batch workers: keep-alive connections
per replica, answers parsed by httptools (the parser uvicorn serves with), bodies streamed with
flow control.

Why not httpx or aiohttp here: this hop's CPU per request bounds the gateway's throughput, and
``benchmarks/upstream_client.py`` measures the three clients on it in one run (see
docs/results.md): 0.16 ms of CPU per request for ours, 0.23-0.25 for aiohttp, 2.4-2.8 for
httpx (16 in flight on uvloop, two runs on the 2-core VM, 2026-11-30). This client does only
what the hop needs: POST a JSON body to ``http(s)://host:port/path`` and hand back the status,
the headers and the body as it comes. It has at most :data:`MAX_CONNECTIONS_PER_REPLICA`
requests in flight to one replica (one beyond waits for a slot, up to the connect timeout),
closes connections idle for :data:`IDLE_TIMEOUT_S`, and forgets the replicas gone.

Elsewhere one HTTP client per role: httpx where a person or a test waits on one call (the
client's transports, the CLI, health probes), this one on the gateway's and the batch
workers' hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0
"""Longest wait for the next bytes of an answer (a long generation streams, so this is rare)."""
MAX_IDLE_PER_REPLICA = 256
MAX_CONNECTIONS_PER_REPLICA = 1024
"""Requests in flight to one replica at most, each on a connection of its own (idle ones are
kept up to :data:`MAX_IDLE_PER_REPLICA`): a flood waits, it does not spend the gateway's file
descriptors."""
IDLE_TIMEOUT_S = 60.0
"""An idle connection older than this is closed (engines close theirs after a while too)."""
_SWEEP_EVERY_S = 15.0
_HIGH_WATER, _LOW_WATER = 64, 16
"""Body chunks held for a slow reader before the socket is paused, and when it resumes."""


class UpstreamError(Exception):
    """The replica could not be reached, or it broke the connection before the answer ended."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered
        """Whether any of the answer had arrived (then the request may have been carried out)."""


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as a Host header writes it (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> _Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)


@dataclass
class _Exchange:
    """One request's answer as it arrives."""

    head: asyncio.Future[None]
    chunks: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    keep_alive: bool = False
    complete: bool = False
    error: UpstreamError | None = None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"not HTTP from the engine: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection closed by the engine{f': {exc}' if exc else ''}")

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.head.done():
            exchange.status = self.parser.get_status_code()
            exchange.keep_alive = self.parser.should_keep_alive()
            exchange.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.exchange is None:
            return
        self.exchange.chunks.put_nowait(bytes(body))
        if self.exchange.chunks.qsize() >= _HIGH_WATER and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.complete = True
            self.exchange.chunks.put_nowait(None)

    # -- ours ----------------------------------------------------------------------------
    def send(self, request: bytes) -> _Exchange:
        self.exchange = _Exchange(asyncio.get_running_loop().create_future())
        assert self.transport is not None
        self.transport.write(request)
        return self.exchange

    def reading(self) -> None:
        """The reader took a chunk: resume the socket once the backlog is small."""
        exchange = self.exchange
        if self.paused and exchange and exchange.chunks.qsize() <= _LOW_WATER and self.transport:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, message: str) -> None:
        exchange = self.exchange
        if exchange is None or exchange.complete or exchange.error is not None:
            return
        exchange.error = UpstreamError(message, answered=exchange.head.done())
        if not exchange.head.done():
            exchange.head.set_exception(exchange.error)
        exchange.chunks.put_nowait(None)


class _Slots:
    """Requests in flight to one replica: at most ``limit``; one more waits for a free slot."""

    def __init__(self, limit: int) -> None:
        self.busy = 0
        self._free = asyncio.Semaphore(limit)

    async def take(self, timeout_s: float) -> bool:
        """A slot, waiting up to ``timeout_s`` only when none is free (the common case costs
        no timer); False if none came."""
        if self._free.locked():
            try:
                async with asyncio.timeout(timeout_s):
                    await self._free.acquire()
            except TimeoutError:
                return False
        else:
            await self._free.acquire()  # returns at once: a slot is free
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1
        self._free.release()


class UpstreamResponse:
    """An engine's answer: status and headers now, the body as it comes."""

    def __init__(self, client: Upstream, origin: _Origin, conn: _Connection, ex: _Exchange):
        """``conn`` holds one of ``origin``'s slots until :meth:`close`."""
        self._client, self._origin, self._conn, self._exchange = client, origin, conn, ex
        self.status = ex.status
        self.headers = ex.headers
        self._done = False

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece; raises :class:`UpstreamError` if the engine breaks off."""
        try:
            while True:
                try:
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        chunk = await self._exchange.chunks.get()
                except TimeoutError:
                    raise UpstreamError(
                        f"no bytes from the engine for {READ_TIMEOUT_S:.0f} s", answered=True
                    ) from None
                self._conn.reading()
                if chunk is None:
                    if self._exchange.error is not None:
                        raise self._exchange.error
                    return
                yield chunk
        finally:
            self.close()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.chunks()])

    def __del__(self) -> None:
        # An answer dropped unread (a streamed one whose caller left before it began): its
        # connection cannot serve again, and its slot must not stay taken.
        if getattr(self, "_done", True):
            return
        self._done = True
        with contextlib.suppress(RuntimeError):  # the loop may be closed already, at exit
            self._conn.close()
            self._client._release(self._origin)

    def close(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can be reused."""
        if self._done:
            return
        self._done = True
        ex = self._exchange
        if ex.complete and ex.keep_alive and ex.error is None and not self._conn.closed:
            self._client._idle(self._origin, self._conn)
        else:
            self._client._drop(self._origin, self._conn)


class Upstream:
    """Keep-alive connections to every replica the gateway sends to."""

    def __init__(self, max_connections_per_replica: int = MAX_CONNECTIONS_PER_REPLICA) -> None:
        self._pools: dict[_Origin, list[_Connection]] = {}
        self._slots: dict[_Origin, _Slots] = {}
        self._max = max_connections_per_replica
        self._tls = ssl.create_default_context()
        self._swept = time.monotonic()

    def in_flight(self, url: str) -> int:
        """Requests to ``url``'s replica whose answers are not closed yet."""
        slots = self._slots.get(_Origin.parse(url))
        return 0 if slots is None else slots.busy

    def idle(self, url: str) -> int:
        """Connections to ``url``'s replica kept open for the next request."""
        return len(self._pools.get(_Origin.parse(url), ()))

    async def post(self, url: str, body: bytes) -> UpstreamResponse:
        """POST ``body`` (JSON) to ``url``; returns once the answer's head is in."""
        origin = _Origin.parse(url)
        target = urlsplit(url)
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        request = (
            f"POST {path} HTTP/1.1\r\nhost: {origin.authority}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        self._sweep()
        slots = self._slots.get(origin) or self._slots.setdefault(origin, _Slots(self._max))
        if not await slots.take(CONNECT_TIMEOUT_S):
            raise UpstreamError(
                f"all {self._max} connections to {origin.authority} stayed busy for "
                f"{CONNECT_TIMEOUT_S:.0f} s"
            )
        try:
            conn, reused = await self._connection(origin)
            try:
                exchange = await self._exchange(conn, request)
            except UpstreamError as exc:
                if not (reused and not exc.answered):
                    raise
                # A kept-alive connection the engine had just closed: once more on a new one.
                conn, _ = await self._connection(origin, fresh=True)
                exchange = await self._exchange(conn, request)
        except BaseException:
            slots.give()
            raise
        return UpstreamResponse(self, origin, conn, exchange)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            for conn in pool:
                conn.close()
        self._pools.clear()
        self._slots.clear()
        await asyncio.sleep(0)  # let the transports finish closing while the loop runs

    async def _exchange(self, conn: _Connection, request: bytes) -> _Exchange:
        exchange = conn.send(request)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                await exchange.head
        except TimeoutError:
            conn.close()
            raise UpstreamError(f"no answer from the engine in {READ_TIMEOUT_S:.0f} s") from None
        except UpstreamError:
            conn.close()
            raise
        return exchange

    async def _connection(self, origin: _Origin, fresh: bool = False) -> tuple[_Connection, bool]:
        pool = self._pools.setdefault(origin, [])
        while pool and not fresh:
            conn = pool.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=self._tls if origin.scheme == "https" else None,
                )
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise UpstreamError(f"cannot connect to {origin.authority}: {reason}") from None
        return conn, False

    def _idle(self, origin: _Origin, conn: _Connection) -> None:
        """An answer is done and its connection can serve again: keep it (bounded)."""
        conn.exchange = None
        pool = self._pools.setdefault(origin, [])
        if len(pool) < MAX_IDLE_PER_REPLICA:
            conn.idle_since = time.monotonic()
            pool.append(conn)
        else:
            conn.close()
        self._release(origin)

    def _drop(self, origin: _Origin, conn: _Connection) -> None:
        """An answer is done and its connection cannot serve again."""
        conn.close()
        self._release(origin)

    def _release(self, origin: _Origin) -> None:
        slots = self._slots.get(origin)
        if slots is not None:
            slots.give()

    def _sweep(self) -> None:
        """Now and then: close connections idle too long, or closed by their engine, and
        forget the replicas left with none open (those that went away)."""
        now = time.monotonic()
        if now - self._swept < _SWEEP_EVERY_S:
            return
        self._swept = now
        for origin, pool in list(self._pools.items()):
            kept = []
            for conn in pool:
                if conn.closed or now - conn.idle_since > IDLE_TIMEOUT_S:
                    conn.close()
                else:
                    kept.append(conn)
            pool[:] = kept
            slots = self._slots.get(origin)
            if not kept and (slots is None or slots.busy == 0):
                del self._pools[origin]
                self._slots.pop(origin, None)
