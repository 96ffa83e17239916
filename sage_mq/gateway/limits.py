"""Request bodies bounded before they are buffered.

A body whose ``Content-Length`` is over its route's limit is refused at once, unread; one sent
in chunks is counted as it arrives and refused the moment it passes the limit. Either way the
answer is 413 in the shape the route speaks. Uploads (``POST /v1/files``) have a limit of
their own: the largest batch input file, and room for the multipart around it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sage_mq.batch.validate import MAX_FILE_BYTES
from sage_mq.gateway.refusals import refusal
from sage_mq.settings import GatewayOptions

MAX_BODY_BYTES = GatewayOptions.max_body_bytes
"""A JSON request's body (chat with images inline fits; ``--max-body-mib``)."""
UPLOAD_PATH = "/v1/files"
UPLOAD_BYTES = MAX_FILE_BYTES + 1024 * 1024


class _TooLarge(BaseException):
    """Raised from ``receive`` past the limit. Not an Exception: nothing between here and the
    app may turn it into a 400 or a 500 (FastAPI does that to errors while reading a body)."""


class BodyLimits:
    """The limit of each route, and the guard that keeps to it."""

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_body_bytes = max_body_bytes

    def limit(self, path: str) -> int:
        return UPLOAD_BYTES if path == UPLOAD_PATH else self.max_body_bytes

    async def guard(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Run ``app`` for the request, unless or until its body is over the limit."""
        limit = self.limit(scope["path"])
        declared, chunked = _framing(scope)
        if declared is not None:  # the server reads no more than that: nothing to count
            if declared > limit:
                await self._refuse(scope, receive, send, limit)
            else:
                await app(scope, receive, send)
            return
        if not chunked:
            await app(scope, receive, send)  # no body at all
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        path = scope["path"]
        what = "an upload" if path == UPLOAD_PATH else "a request body"
        message = f"{what} here is at most {limit} bytes; this one is larger"
        await refusal(path, 413, message, code="request_too_large")(scope, receive, send)


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The request's Content-Length (None if it has none) and whether it is chunked."""
    length, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0  # (the parser refuses a bad one)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked
