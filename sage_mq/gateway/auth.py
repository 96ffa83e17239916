"""API keys: one for inference, one for management, compared in constant time, never logged."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.responses import JSONResponse, Response

from sage_mq.gateway.proxy import openai_error

Next = Callable[[Request], Awaitable[Response]]
_OPEN = ("/health", "/metrics")


class KeyCheck:
    """HTTP middleware: ``/v1/management`` wants the admin key, the other ``/v1`` routes the API
    key (or the admin key). A key that is not set leaves its routes open."""

    def __init__(self, api_key: str | None, admin_key: str | None) -> None:
        self.api_key = api_key or None
        self.admin_key = admin_key or None

    async def __call__(self, request: Request, call_next: Next) -> Response:
        path = request.url.path
        if path in _OPEN or not path.startswith("/v1/"):
            return await call_next(request)
        given = _bearer(request)
        if path.startswith("/v1/management"):
            if self.admin_key and not _same(given, self.admin_key):
                return _refused()
        elif self.api_key and not (
            _same(given, self.api_key) or (self.admin_key and _same(given, self.admin_key))
        ):
            return openai_error(
                401,
                "a valid API key is required: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "invalid_api_key",
            )
        return await call_next(request)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _refused() -> JSONResponse:
    wire = {
        "type": "Unauthorized",
        "message": "the admin key is required: send `Authorization: Bearer <admin key>`",
        "retryable": False,
    }
    return JSONResponse({"error": wire}, status_code=401)
