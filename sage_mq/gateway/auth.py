"""API keys: one for inference, one for management, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sage_mq.gateway.proxy import openai_error

_OPEN = ("/health", "/metrics")


class KeyCheck:
    """ASGI middleware: ``/v1/management`` wants the admin key, the other ``/v1`` routes the API
    key (or the admin key). A key that is not set leaves its routes open. (Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which costs every request a task and a response copy.)"""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.api_key = api_key or None
        self.admin_key = admin_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        if path in _OPEN or not path.startswith("/v1/"):
            return None
        if not (self.api_key or self.admin_key):
            return None
        given = _bearer(Headers(scope=scope))
        if path.startswith("/v1/management"):
            return _refused() if self.admin_key and not _same(given, self.admin_key) else None
        if self.api_key and not (
            _same(given, self.api_key) or (self.admin_key and _same(given, self.admin_key))
        ):
            return openai_error(
                401,
                "a valid API key is required: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None


def _bearer(headers: Headers) -> str:
    header = headers.get("authorization", "")
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
