"""UnifiedInferenceClient: one Python entry point to every model the fleet serves.

``UnifiedInferenceClient.create()`` is the only way in (docs/contract.md §4)::

    client = UnifiedInferenceClient.create()                       # SAGE_CONTROL_PLANE_URL
    client = UnifiedInferenceClient.create(control_plane_url="http://host:8000/v1")  # gateway
    client = UnifiedInferenceClient.create(control_plane_url="redis://host:6379/0")  # direct
    client = UnifiedInferenceClient.create(embedded=True)          # a whole fleet in-process

Through a gateway, the gateway picks replicas. With a Redis URL the client reads RUNNING engines
from the registry (kept current from ``sage:events``), picks a replica itself by
``scheduling_policy`` and calls its URL, moving to another replica if one cannot be reached.
The methods are synchronous and safe to call from many threads; requests go out from the
calling thread. A thread of the client's own runs an event loop for what lives on: the registry
kept current from Redis, and an embedded control plane.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from sage_mq.batch.handles import (
    Batches,
    BatchHandle,
    HttpBatches,
    JobHandle,
    RedisBatches,
    request_lines,
)
from sage_mq.batch.service import BatchService
from sage_mq.broker import Broker
from sage_mq.connection import check_server
from sage_mq.errors import ConfigError, InvalidRequest
from sage_mq.redis_urls import SCHEMES as SENTINEL_SCHEMES
from sage_mq.registry import Registry
from sage_mq.routing import POLICIES, Router
from sage_mq.settings import Settings, control_plane_url_from_env
from sage_mq.transports import DirectTransport, GatewayTransport, Transport

T = TypeVar("T")
Messages = str | Sequence[dict[str, Any]]


class _LoopThread:
    """An event loop in a daemon thread; sync code hands it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="sage-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class UnifiedInferenceClient:
    """Chat, completion and embeddings across the fleet (make one with :meth:`create`)."""

    _transport: Transport
    _loop: _LoopThread
    _closers: list[Any]
    _batches: Batches
    default_llm_model: str | None
    default_embedding_model: str | None

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise TypeError(
            "UnifiedInferenceClient is made with UnifiedInferenceClient.create(...), "
            "e.g. create(control_plane_url='http://localhost:8000/v1')"
        )

    @classmethod
    def create(
        cls,
        *,
        control_plane_url: str | None = None,
        embedded: bool = False,
        default_llm_model: str | None = None,
        default_embedding_model: str | None = None,
        scheduling_policy: str = "adaptive",
        timeout: float = 60.0,
        namespace: str | None = None,
        embedded_preset: str = "demo",
        fake_gpus: str | None = None,
    ) -> UnifiedInferenceClient:
        """A client for the fleet at ``control_plane_url`` (``http(s)://`` a gateway,
        ``redis(s)://`` the registry; default env ``SAGE_CONTROL_PLANE_URL``, else
        ``http://localhost:8000/v1``). With ``embedded`` it starts a whole fleet in this
        process instead (see :mod:`sage_mq.embedded`), applies ``embedded_preset``, and stops
        it all on :meth:`close`."""
        if scheduling_policy not in POLICIES:
            raise ConfigError(
                f"scheduling_policy {scheduling_policy!r} is not one of {', '.join(POLICIES)}"
            )
        url = control_plane_url or control_plane_url_from_env()
        self = object.__new__(cls)
        self.default_llm_model = default_llm_model
        self.default_embedding_model = default_embedding_model
        self._loop = _LoopThread()
        self._closers = []
        try:
            if embedded:
                from sage_mq.embedded import EmbeddedControlPlane  # a whole fleet: only on ask

                join = control_plane_url if _is_redis_url(url) and url[:4] != "unix" else None
                plane = EmbeddedControlPlane(redis_url=join, port=_free_port(), fake_gpus=fake_gpus)
                self._loop.run(plane.start())
                self._closers.append(plane.close)
                self._loop.run(plane.apply(embedded_preset))
                self._transport = GatewayTransport(plane.gateway_url, timeout)
            elif url.startswith(("http://", "https://")):
                self._transport = GatewayTransport(url, timeout)
            elif _is_redis_url(url):
                self._transport = self._loop.run(
                    self._direct(url, namespace, Router(scheduling_policy), timeout)
                )
            else:
                raise ConfigError(
                    f"control_plane_url {url!r} is neither http(s):// (a gateway) "
                    "nor redis(s)://, redis(s)+sentinel:// or unix:// (the registry)"
                )
            if isinstance(self._transport, GatewayTransport):
                self._batches = HttpBatches(self._transport.base, self._transport.http)
        except BaseException:
            self._loop.run(self._close())
            self._loop.stop()
            raise
        return self

    async def _direct(
        self, url: str, namespace: str | None, router: Router, timeout: float
    ) -> DirectTransport:
        settings = Settings.from_env(redis_url=url)
        if namespace:
            settings = Settings(redis_url=url, namespace=namespace, bus=settings.bus)
        broker = Broker(settings)
        self._closers.append(broker.aclose)
        await check_server(broker.redis)
        registry = Registry(broker.store, broker.bus)
        await registry.load()
        follow = asyncio.get_running_loop().create_task(registry.follow())

        async def stop_following() -> None:  # ended here, before the loop stops
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)

        self._closers.append(stop_following)
        self._batches = RedisBatches(BatchService(settings, broker.redis), self._loop.run)
        return DirectTransport(registry, router, timeout)

    # -- queued work -----------------------------------------------------------------------
    def submit_chat(self, messages: Messages, model: str | None = None, **params: Any) -> JobHandle:
        """Queue a chat request for the batch workers; ``.result()`` gives the answer."""
        body = {"model": self._model(model, llm=True), "messages": _messages(messages), **params}
        handle = self.batch([body], endpoint="/v1/chat/completions")
        return JobHandle(handle, lambda answer: str(answer["choices"][0]["message"]["content"]))

    def submit_embed(self, texts: str | Sequence[str], model: str | None = None) -> JobHandle:
        """Queue an embedding request; ``.result()`` gives one vector per text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        body = {"model": self._model(model, llm=False), "input": batch}
        handle = self.batch([body], endpoint="/v1/embeddings")
        return JobHandle(handle, _vectors)

    def batch(
        self, requests: Iterable[dict[str, Any]], endpoint: str = "/v1/chat/completions"
    ) -> BatchHandle:
        """Queue many request bodies (each with its ``model``; an optional ``custom_id``) as one
        batch; the handle gives progress, results and cancel. Needs ``sage llm worker run``."""
        batches: Batches = self._batches
        return BatchHandle(batches, batches.create(request_lines(requests, endpoint), endpoint))

    # -- the API ---------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Every model with a RUNNING engine."""
        return self._transport.models()

    def chat(self, messages: Messages, model: str | None = None, **params: Any) -> str:
        """The assistant's answer to ``messages`` (a string is one user message)."""
        body = {"model": self._model(model, llm=True), "messages": _messages(messages), **params}
        answer = self._transport.post("/chat/completions", body)
        return str(answer["choices"][0]["message"]["content"])

    def chat_stream(
        self, messages: Messages, model: str | None = None, **params: Any
    ) -> Iterator[str]:
        """The assistant's answer as it is written, piece by piece."""
        body = {
            "model": self._model(model, llm=True),
            "messages": _messages(messages),
            **params,
            "stream": True,
        }
        for event in self._transport.stream("/chat/completions", body):
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield str(piece)

    def generate(self, prompt: str, model: str | None = None, **params: Any) -> str:
        """A plain completion of ``prompt``."""
        body = {"model": self._model(model, llm=True), "prompt": prompt, **params}
        answer = self._transport.post("/completions", body)
        return str(answer["choices"][0]["text"])

    def embed(self, texts: str | Sequence[str], model: str | None = None) -> list[list[float]]:
        """One vector per text (a single string gives a list of one)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        body = {"model": self._model(model, llm=False), "input": batch}
        return _vectors(self._transport.post("/embeddings", body))

    def close(self) -> None:
        """Close connections and stop the client's thread; safe to call twice."""
        if not self._loop.thread.is_alive():
            return
        self._loop.run(self._close())
        self._loop.stop()

    async def _close(self) -> None:
        if hasattr(self, "_transport"):
            self._transport.close()
        for close in reversed(self._closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self, model: str | None, *, llm: bool) -> str:
        chosen = model or (self.default_llm_model if llm else self.default_embedding_model)
        if chosen:
            return chosen
        served = self.models()
        if len(served) == 1:
            return served[0]
        kind = "default_llm_model" if llm else "default_embedding_model"
        raise InvalidRequest(
            f"say which model (or set {kind} in create()): one of {', '.join(served) or 'none'}"
        )


def _is_redis_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("redis", "rediss", "unix", *SENTINEL_SCHEMES)


def _vectors(answer: dict[str, Any]) -> list[list[float]]:
    rows = sorted(answer["data"], key=lambda row: row["index"])
    return [list(map(float, row["embedding"])) for row in rows]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]
