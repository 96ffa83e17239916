"""Queued work from the Python client: a handle per request, a handle per batch.

Both ride on the Batch API machinery (a request queued alone is a batch of one), so they get its
guarantees: checked before any work, each outcome recorded once, chunks of killed workers run
again, requests wait out engine restarts. Two ways to reach it: a gateway's ``/v1/files`` and
``/v1/batches`` (:class:`HttpBatches`), or Redis directly (:class:`RedisBatches`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import httpx

from sage_mq.batch.records import FINAL
from sage_mq.batch.service import BatchService
from sage_mq.errors import InferenceError, InvalidRequest, WaitTimeout

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class Batches(Protocol):
    """What the handles need: create, read and cancel batches, and read files."""

    def create(self, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]: ...

    def get(self, batch_id: str) -> dict[str, Any]: ...

    def cancel(self, batch_id: str) -> dict[str, Any]: ...

    def content(self, file_id: str) -> bytes: ...

    def finished(self, batch_id: str, after: int, limit: int) -> dict[str, Any]: ...


class HttpBatches:
    """Through a gateway's Batch API."""

    def __init__(self, base: str, http: httpx.Client) -> None:
        self.base = base
        self.http = http

    def create(self, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
        upload = self._check(
            self.http.post(
                f"{self.base}/files",
                files={"file": ("requests.jsonl", _jsonl(lines))},
                data={"purpose": "batch"},
            )
        )
        body = {"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"}
        return self._check(self.http.post(f"{self.base}/batches", json=body))

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"{self.base}/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"{self.base}/batches/{batch_id}/cancel"))

    def finished(self, batch_id: str, after: int, limit: int) -> dict[str, Any]:
        params = {"after": after, "limit": limit}
        return self._check(self.http.get(f"{self.base}/batches/{batch_id}/results", params=params))

    def content(self, file_id: str) -> bytes:
        response = self.http.get(f"{self.base}/files/{file_id}/content")
        if response.status_code >= 400:
            raise InferenceError(f"file {file_id}: HTTP {response.status_code}: {response.text}")
        return response.content

    @staticmethod
    def _check(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise InvalidRequest(f"the gateway refused: {message}")
        answer: dict[str, Any] = response.json()
        return answer


class RedisBatches:
    """Straight to Redis (the client's Redis mode), on the client's event loop."""

    def __init__(self, service: BatchService, run: Runner) -> None:
        self.service = service
        self.run = run

    def create(self, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
        upload = self.run(
            self.service.records.create_file(_jsonl(lines), "requests.jsonl", "batch")
        )
        batch: dict[str, Any] = self.run(self.service.create(upload["id"], endpoint))
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        batch: dict[str, Any] = self.run(self.service.get(batch_id))
        return batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch: dict[str, Any] = self.run(self.service.cancel(batch_id))
        return batch

    def finished(self, batch_id: str, after: int, limit: int) -> dict[str, Any]:
        page: dict[str, Any] = self.run(self.service.finished(batch_id, after, limit))
        return page

    def content(self, file_id: str) -> bytes:
        content: bytes | None = self.run(self.service.records.file_content(file_id))
        return content or b""


class BatchHandle:
    """A batch submitted from the client: progress, results as they finish, cancel."""

    def __init__(self, batches: Batches, batch: dict[str, Any]) -> None:
        self.batches = batches
        self.id = str(batch["id"])
        self._batch = batch
        if batch["status"] == "failed":
            errors = batch["errors"]["data"]
            problems = "; ".join(f"line {e.get('line')}: {e['message']}" for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise InvalidRequest(f"the batch was refused: {problems}{more}")

    def refresh(self) -> dict[str, Any]:
        self._batch = self.batches.get(self.id)
        return self._batch

    @property
    def status(self) -> str:
        return str(self.refresh()["status"])

    def progress(self) -> dict[str, int]:
        """``{"completed", "failed", "total"}`` now."""
        counts: dict[str, int] = self.refresh()["request_counts"]
        return counts

    def cancel(self) -> None:
        self._batch = self.batches.cancel(self.id)

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        """The batch once it has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.refresh()["status"] not in FINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"batch {self.id} still {self._batch['status']} after {timeout}s")
            time.sleep(poll_s)
        return self._batch

    def results(
        self, timeout: float | None = None, poll_s: float = 0.2
    ) -> Iterator[dict[str, Any]]:
        """Output and error lines (OpenAI's shape) as the requests finish, until the batch has
        ended; each request once. ``timeout`` bounds the whole wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            page = self.batches.finished(self.id, seen, 1000)
            yield from page["data"]
            seen = page["next"]
            if page["data"]:
                continue
            if page["batch_status"] in FINAL:  # read before the lines: none can be missing
                return
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"batch {self.id} still {page['batch_status']} after {timeout}s")
            time.sleep(poll_s)


class JobHandle:
    """One queued request: ``status``, ``result(timeout)``, ``cancel()``."""

    def __init__(self, batch: BatchHandle, extract: Callable[[dict[str, Any]], Any]) -> None:
        self._batch = batch
        self._extract = extract
        self.id = batch.id

    @property
    def status(self) -> str:
        """``queued``/``running`` until done, then ``finished``, ``failed`` or ``cancelled``."""
        batch = self._batch.refresh()
        if batch["status"] == "cancelled":
            return "cancelled"
        if batch["status"] in FINAL:
            return "finished" if batch["request_counts"]["completed"] else "failed"
        return "running" if batch["status"] != "validating" else "queued"

    def result(self, timeout: float | None = None) -> Any:
        """The answer (as ``chat``/``embed`` give it); raises if it failed or was cancelled."""
        for line in self._batch.results(timeout):
            if line.get("error") or line["response"]["status_code"] >= 400:
                error = line.get("error") or line["response"]["body"].get("error", {})
                raise InferenceError(f"the queued request failed: {error.get('message', error)}")
            return self._extract(line["response"]["body"])
        raise InferenceError(f"the queued request {self.id} was cancelled before it ran")

    def cancel(self) -> None:
        self._batch.cancel()


def request_lines(bodies: Iterable[dict[str, Any]], endpoint: str) -> list[dict[str, Any]]:
    """Batch input lines for request bodies (a body may carry its own ``custom_id``)."""
    lines = []
    for body in bodies:
        body = dict(body)
        custom_id = str(body.pop("custom_id", None) or uuid.uuid4().hex)
        lines.append({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body})
    return lines


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
