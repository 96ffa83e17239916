"""How the client reaches engines: through a gateway, or straight to engine URLs from Redis.

Both are synchronous (``httpx.Client``) and run in the caller's thread: a request costs no hop
to another thread, and many threads may call at once. Only the registry of the direct way is
kept current on the client's event loop, and it is read here as an immutable snapshot.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import httpx

from sage_mq.errors import InferenceError, ModelNotFound
from sage_mq.failover import Failover, worth_another
from sage_mq.routing import NoReplica, Replica, Router


class Transport(Protocol):
    """What the client needs from a way to the engines."""

    def models(self) -> list[str]: ...

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


class GatewayTransport:
    """Requests to a gateway's OpenAI API (``http(s)://host:port/v1``)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        self.http = httpx.Client(timeout=timeout)

    def models(self) -> list[str]:
        response = self._send("GET", "/models", None)
        return [m["id"] for m in response.json()["data"]]

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self._send("POST", path, body).json()
        return answer

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", f"{self.base}{path}", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response, self.base)
                yield from sse_events(response)
        except httpx.TransportError as exc:
            raise _unreachable(self.base, exc) from None

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        try:
            response = self.http.request(method, f"{self.base}{path}", json=body)
        except httpx.TransportError as exc:
            raise _unreachable(self.base, exc) from None
        if response.status_code >= 400:
            raise _error(response, self.base)
        return response


class DirectTransport:
    """Requests straight to engine URLs, replicas chosen here from the registry in Redis."""

    def __init__(self, replicas: Any, router: Router, timeout: float) -> None:
        self.registry = replicas
        """Anything with ``replicas(model)``, ``models()`` and ``coming(model)`` (a Registry)."""
        self.router = router
        self.http = httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        """The router's counters, shared by the threads that call."""

    def models(self) -> list[str]:
        models: list[str] = self.registry.models()
        return models

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        walk = Failover(self.router, str(body.get("model")))
        while True:
            replica = self._start(walk)
            started = time.monotonic()
            try:
                response = self.http.post(f"{replica.url}/v1{path}", json=body)
            except httpx.TransportError as exc:
                self._finish(replica, None)
                walk.failed(replica, str(exc))
                continue
            if worth_another(response.status_code):
                self._finish(replica, None)
                walk.failed(replica, f"HTTP {response.status_code}")
                continue
            self._finish(replica, time.monotonic() - started)
            if response.status_code >= 400:
                raise _error(response, replica.engine_id)
            answer: dict[str, Any] = response.json()
            return answer

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        walk = Failover(self.router, str(body.get("model")))
        while True:
            replica = self._start(walk)
            started, began = time.monotonic(), False
            try:
                with self.http.stream("POST", f"{replica.url}/v1{path}", json=body) as resp:
                    if worth_another(resp.status_code):
                        walk.failed(replica, f"HTTP {resp.status_code}")
                        continue
                    if resp.status_code >= 400:
                        resp.read()
                        raise _error(resp, replica.engine_id)
                    for event in sse_events(resp):
                        began = True
                        yield event
                    return
            except httpx.TransportError as exc:
                if began:  # part of the answer is out: not ours to send again
                    raise InferenceError(
                        f"{replica.engine_id} broke off its answer: {exc}", retryable=True
                    ) from None
                walk.failed(replica, str(exc))
            finally:
                self._finish(replica, time.monotonic() - started if began else None)

    def close(self) -> None:
        self.http.close()

    def _start(self, walk: Failover) -> Replica:
        with self._lock:
            replica = self._choose(walk)
            self.router.started(replica)
        return replica

    def _finish(self, replica: Replica, latency_s: float | None) -> None:
        with self._lock:
            self.router.finished(replica, latency_s)

    def _choose(self, walk: Failover) -> Replica:
        model = walk.model
        replicas = self.registry.replicas(model)
        if not replicas:
            if self.registry.coming(model):
                raise InferenceError(
                    f"no replica of {model!r} is RUNNING right now (see `sage llm engine list`)",
                    status=503,
                    retryable=True,
                )
            served = ", ".join(self.registry.models()) or "none yet"
            raise ModelNotFound(f"no engine serves {model!r}; models being served: {served}")
        try:
            return walk.choose(replicas)
        except NoReplica as exc:
            raise InferenceError(str(exc), status=503, retryable=True) from None


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, until ``[DONE]``; an error event (a
    replica lost mid-stream, say) raises :class:`InferenceError`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event: dict[str, Any] = json.loads(data)
        if isinstance(event.get("error"), dict):
            message = event["error"].get("message") or "the stream broke off"
            raise InferenceError(f"stream ended with an error: {message}", retryable=True)
        yield event


def _error(response: httpx.Response, where: str) -> Exception:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") or response.text[:300] or response.reason_phrase
    if response.status_code == 404 and error.get("code") == "model_not_found":
        return ModelNotFound(message)
    retryable = worth_another(response.status_code)
    return InferenceError(
        f"{where} answered HTTP {response.status_code}: {message}",
        status=response.status_code,
        retryable=retryable,
    )


def _unreachable(base: str, exc: Exception) -> InferenceError:
    return InferenceError(
        f"cannot reach the gateway at {base}: {exc} (is `sage llm gateway run` running?)",
        retryable=True,
    )
