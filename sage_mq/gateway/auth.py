"""API keys: who may call which route, compared in constant time, never logged; and where a
gateway may listen without them.

With no key configured the gateway answers everyone, so it serves on loopback only. Once any
key is configured, ``/v1/management`` wants the admin key (and is closed if there is none),
and every other route but ``/health`` (the rest of ``/v1``, ``/metrics``) wants a valid key:
the API key or the admin key.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sage_mq.errors import ConfigError
from sage_mq.gateway.proxy import openai_error

_OPEN = frozenset({"/health"})
_KEYED_OUTSIDE_V1 = frozenset({"/metrics"})
log = logging.getLogger(__name__)


class KeyCheck:
    """ASGI middleware that lets a request through only with the key its route wants (see the
    module doc). Plain ASGI, not Starlette's BaseHTTPMiddleware, which costs every request a
    task and a response copy."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.api_key = api_key or None
        self.admin_key = admin_key or None
        self.valid = tuple(k.encode() for k in (self.api_key, self.admin_key) if k)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" and self.valid else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        if path in _OPEN or not (path.startswith("/v1/") or path in _KEYED_OUTSIDE_V1):
            return None
        given = _bearer(Headers(scope=scope)).encode()
        if path.startswith("/v1/management"):
            if self.admin_key is None:
                return _management(
                    403,
                    "management is closed on this gateway: it has no admin key "
                    "(start it with --admin-key or SAGE_MQ_ADMIN_KEY)",
                )
            if not hmac.compare_digest(given, self.admin_key.encode()):
                return _management(
                    401, "the admin key is required: send `Authorization: Bearer <admin key>`"
                )
            return None
        if not any(hmac.compare_digest(given, key) for key in self.valid):
            return openai_error(
                401,
                "a valid API key is required: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None


def check_exposure(host: str, admin_key: str | None, *, insecure: bool = False) -> None:
    """Refuse to serve beyond loopback without an admin key: whoever reaches the port could
    start, stop and reconfigure engines. ``insecure`` overrides, loudly."""
    if is_loopback(host) or admin_key:
        return
    if not insecure:
        raise ConfigError(
            f"refusing to serve on {host} without an admin key: anyone who reaches it could "
            "start and stop engines. Set --admin-key (or SAGE_MQ_ADMIN_KEY), and --api-key for "
            "inference; or serve on 127.0.0.1; or pass --insecure if a firewall you trust does "
            "the job"
        )
    log.warning(
        "INSECURE: serving on %s with no admin key (--insecure): anyone who reaches this port "
        "can start, stop and reconfigure engines",
        host,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _bearer(headers: Headers) -> str:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _management(status: int, message: str) -> JSONResponse:
    wire = {"type": "Unauthorized", "message": message, "retryable": False}
    return JSONResponse({"error": wire}, status_code=status)
