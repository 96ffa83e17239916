"""How the gateway says no: JSON a person can act on, in our shape on ``/v1/management``
(``{"error": {type, message, retryable}}``) and in OpenAI's everywhere else, whatever refused
the request (a body that does not fit, a method the route does not take, a body nested too
deep to parse, one of our errors)."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from sage_mq.errors import (
    ConfigError,
    ControlPlaneUnavailable,
    EngineFailedError,
    EngineNotFound,
    InvalidRequest,
    PresetApplyError,
    RequestRejectedError,
    SageMQError,
    WaitTimeout,
)
from sage_mq.gateway.proxy import openai_error
from sage_mq.presets import PresetNotFound

_OUR_KIND = {
    400: "InvalidRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "TooLarge",
}


def refusal(
    path: str,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error answer for a request to ``path``, in the shape its route speaks."""
    if path.startswith("/v1/management"):
        kind = _OUR_KIND.get(status, "InvalidRequest")
        wire = {"type": kind, "message": message, "retryable": False}
        answer = JSONResponse({"error": wire}, status_code=status)
    else:
        code = code or ("not_found" if status == 404 else None)
        answer = openai_error(status, message, "invalid_request_error", code)
    answer.headers.update(headers or {})
    return answer


async def on_bad_body(request: Request, exc: Exception) -> JSONResponse:
    """A body or parameter that does not fit its model, naming the first field and why: 422
    on management routes, 400 on OpenAI's (as OpenAI answers)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = f"field {where!r}: {first.get('msg', 'invalid')} ({len(exc.errors())} error(s))"
    path = request.url.path
    return refusal(path, 422 if path.startswith("/v1/management") else 400, message)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's refusals (404 no such route, 405) in our shapes; a 405's ``Allow`` lists
    every method of the path (Starlette names only those of the route it tried first)."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_methods(request))
    return refusal(request.url.path, exc.status_code, str(exc.detail), headers)


def _methods(request: Request) -> list[str]:
    """The methods the gateway's OpenAPI document lists for the request's path."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def on_too_deep(request: Request, _exc: Exception) -> JSONResponse:
    """JSON nested past what the parser recurses into (never a 500)."""
    return refusal(request.url.path, 400, "the body is nested too deeply to be a request")


async def on_our_error(_request: Request, exc: Exception) -> JSONResponse:
    """:class:`SageMQError` with the status that says what kind it is."""
    assert isinstance(exc, SageMQError)
    return error_response(exc)


_STATUS: list[tuple[type[SageMQError], int]] = [
    (EngineNotFound, 404),
    (PresetNotFound, 404),
    (InvalidRequest, 400),
    (ConfigError, 400),
    (RequestRejectedError, 409),
    (EngineFailedError, 409),
    (PresetApplyError, 409),
    (WaitTimeout, 504),
    (ControlPlaneUnavailable, 503),
]


def error_response(exc: SageMQError) -> JSONResponse:
    """Our error as JSON with the status that says what kind it is."""
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"error": exc.to_wire()}, status_code=status)
