"""Checking a batch input file before any GPU time is spent: pure functions, no I/O.

An input file is JSON Lines, one request a line, as OpenAI's Batch API has it::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Every problem is reported with its line number (from 1), the field and what to do, all of them
at once, so a user fixes the file in one pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS = ("24h",)
MAX_REQUESTS = 50_000
"""Requests in one batch (OpenAI's limit too)."""
MAX_FILE_BYTES = 100 * 1024 * 1024
"""An input file's size; files live in Redis, so this bounds what one batch costs it."""
MAX_LINES = 2 * MAX_REQUESTS
"""Lines in an input file, blank ones included."""
MAX_ERRORS = 100
"""Problems reported per file (the rest are counted)."""


@dataclass(frozen=True)
class BatchRequest:
    """One checked line of an input file."""

    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    """One problem, in the shape of OpenAI's ``batch.errors.data`` items."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def check_lines(
    lines: list[str], endpoint: str, *, max_requests: int = MAX_REQUESTS
) -> tuple[list[BatchRequest], list[LineError]]:
    """The requests of an input file, or every problem found in it (requests are then [])."""
    if endpoint not in ENDPOINTS:
        return [], [LineError("invalid_endpoint", _endpoint_message(endpoint), param="endpoint")]
    requests: list[BatchRequest] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue  # blank lines (a trailing newline, say) carry nothing
        request, problem = _check_line(number, text, endpoint)
        if problem is None and request is not None:
            first = seen.setdefault(request.custom_id, number)
            if first != number:
                problem = LineError(
                    "duplicate_custom_id",
                    f"custom_id {request.custom_id!r} is also on line {first}; "
                    "each request needs its own",
                    number,
                    "custom_id",
                )
        if problem is not None:
            errors.append(problem)
        elif request is not None:
            requests.append(request)
    if not errors and not requests:
        errors.append(LineError("empty_file", "the input file holds no requests"))
    if len(requests) + len(errors) > max_requests:
        errors.insert(
            0,
            LineError(
                "too_many_requests",
                f"the file holds {len(requests) + len(errors)} requests; a batch takes at most "
                f"{max_requests}: split it into several batches",
            ),
        )
    if errors:
        extra = len(errors) - MAX_ERRORS
        errors = errors[:MAX_ERRORS]
        if extra > 0:
            errors.append(LineError("more_errors", f"and {extra} more problems like these"))
        return [], errors
    return requests, []


def _check_line(
    number: int, text: str, endpoint: str
) -> tuple[BatchRequest | None, LineError | None]:
    try:
        item = json.loads(text)
    except ValueError as exc:
        return None, LineError("invalid_json_line", f"not JSON: {exc}", number)
    if not isinstance(item, dict):
        return None, LineError("invalid_json_line", "each line must be a JSON object", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, LineError(
            "missing_custom_id", "`custom_id` must be a non-empty string", number, "custom_id"
        )
    method = item.get("method", "POST")
    if method != "POST":
        return None, LineError(
            "invalid_method", f'`method` must be "POST", not {method!r}', number, "method"
        )
    url = item.get("url")
    if url != endpoint:
        return None, LineError(
            "mismatched_url",
            f"`url` is {url!r} but this batch's endpoint is {endpoint!r}: every line must use it",
            number,
            "url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return None, LineError("invalid_body", "`body` must be a JSON object", number, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, LineError(
            "missing_model", "`body.model` must name the model to use", number, "body.model"
        )
    if body.get("stream"):
        return None, LineError(
            "invalid_body", "`body.stream` cannot be true in a batch", number, "body.stream"
        )
    return BatchRequest(number, custom_id, body), None


def _endpoint_message(endpoint: str) -> str:
    return f"endpoint {endpoint!r} cannot be batched; use one of {', '.join(ENDPOINTS)}"
