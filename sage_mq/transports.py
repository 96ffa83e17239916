"""How the client reaches engines: through a gateway, or straight to engine URLs from Redis."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from sage_mq.errors import InferenceError, ModelNotFound
from sage_mq.routing import NoReplica, Replica, Router

_RETRY_STATUS = {502, 503, 504}


class Transport(Protocol):
    """What the client needs from a way to the engines."""

    async def models(self) -> list[str]: ...

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def close(self) -> None: ...


class GatewayTransport:
    """Requests to a gateway's OpenAI API (``http(s)://host:port/v1``)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        self.http = httpx.AsyncClient(timeout=timeout)

    async def models(self) -> list[str]:
        response = await self._send("GET", "/models", None)
        return [m["id"] for m in response.json()["data"]]

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = (await self._send("POST", path, body)).json()
        return answer

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self.http.stream("POST", f"{self.base}{path}", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response, self.base)
                async for event in sse_events(response):
                    yield event
        except httpx.TransportError as exc:
            raise _unreachable(self.base, exc) from None

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        try:
            response = await self.http.request(method, f"{self.base}{path}", json=body)
        except httpx.TransportError as exc:
            raise _unreachable(self.base, exc) from None
        if response.status_code >= 400:
            raise _error(response, self.base)
        return response


class DirectTransport:
    """Requests straight to engine URLs, replicas chosen here from the registry in Redis."""

    def __init__(self, replicas: Any, router: Router, timeout: float) -> None:
        self.registry = replicas
        """Anything with ``replicas(model)``, ``models()`` and ``known(model)`` (a Registry)."""
        self.router = router
        self.http = httpx.AsyncClient(timeout=timeout)

    async def models(self) -> list[str]:
        models: list[str] = self.registry.models()
        return models

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        tried: set[str] = set()
        while True:
            replica = self._choose(str(body.get("model")), tried)
            self.router.started(replica)
            started = time.monotonic()
            try:
                response = await self.http.post(f"{replica.url}/v1{path}", json=body)
            except httpx.TransportError:
                self.router.finished(replica, None)
                tried.add(replica.engine_id)
                continue
            if response.status_code in _RETRY_STATUS:
                self.router.finished(replica, None)
                tried.add(replica.engine_id)
                continue
            self.router.finished(replica, time.monotonic() - started)
            if response.status_code >= 400:
                raise _error(response, replica.engine_id)
            answer: dict[str, Any] = response.json()
            return answer

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        tried: set[str] = set()
        while True:
            replica = self._choose(str(body.get("model")), tried)
            self.router.started(replica)
            started, began = time.monotonic(), False
            try:
                async with self.http.stream("POST", f"{replica.url}/v1{path}", json=body) as resp:
                    if resp.status_code in _RETRY_STATUS:
                        tried.add(replica.engine_id)
                        continue
                    if resp.status_code >= 400:
                        await resp.aread()
                        raise _error(resp, replica.engine_id)
                    async for event in sse_events(resp):
                        began = True
                        yield event
                    return
            except httpx.TransportError as exc:
                if began:  # part of the answer is out: not ours to send again
                    raise InferenceError(
                        f"{replica.engine_id} broke off its answer: {exc}", retryable=True
                    ) from None
                tried.add(replica.engine_id)
            finally:
                elapsed = time.monotonic() - started
                self.router.finished(replica, elapsed if began else None)

    async def close(self) -> None:
        await self.http.aclose()

    def _choose(self, model: str, tried: set[str]) -> Replica:
        replicas = self.registry.replicas(model)
        if not replicas:
            if self.registry.known(model):
                raise InferenceError(
                    f"no replica of {model!r} is RUNNING right now (see `sage llm engine list`)",
                    status=503,
                    retryable=True,
                )
            served = ", ".join(self.registry.models()) or "none yet"
            raise ModelNotFound(f"no engine serves {model!r}; models being served: {served}")
        try:
            return self.router.choose(replicas, exclude=tried)
        except NoReplica:
            raise InferenceError(
                f"every RUNNING replica of {model!r} failed ({len(tried)} tried); "
                "try again shortly (engines restart on their own)",
                status=503,
                retryable=True,
            ) from None


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, until ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event: dict[str, Any] = json.loads(data)
        yield event


def _error(response: httpx.Response, where: str) -> Exception:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") or response.text[:300] or response.reason_phrase
    if response.status_code == 404 and error.get("code") == "model_not_found":
        return ModelNotFound(message)
    retryable = response.status_code in _RETRY_STATUS
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
