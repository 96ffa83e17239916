"""Connections to the primary under Sentinel: each new one checks that the server it reached is
the primary.

redis-py trusts the first sentinel that answers, and checks nothing but PING on the server it
names. Sentinels learn of a failover from each other a second or two apart, so one that lags
can still name the old primary, and that server may be back already as the new one's replica,
serving its old data to reads (writes fail with READONLY, reads do not): a handler reading a
record there would act on an old state. Redis' guide for Sentinel clients asks for a ``ROLE``
check after each connect; this module does it (sync and asyncio), and asks the next sentinel
when the server is a replica.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio.connection as aioconnection
import redis.asyncio.sentinel as aiosentinel
import redis.connection as connection
import redis.sentinel as sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError
from redis.retry import Retry

log = logging.getLogger(__name__)

_warned_no_role = False


def role_problem(reply: Sequence[Any], address: tuple[str, int], service: str) -> str | None:
    """Why the server at ``address`` that answered ``ROLE`` with ``reply`` may not serve as the
    primary of ``service``, or None if it is a primary (pure)."""
    role = _text(reply[0]) if reply else "unknown"
    if role == "master":
        return None
    return (
        f"{address[0]}:{address[1]}, named the primary of {service!r} by a sentinel, is a "
        f"{'replica' if role == 'slave' else role} (a failover in progress, that sentinel behind "
        "the others): asking the next sentinel"
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _refusal(pool: Any, address: tuple[str, int], reply: Any) -> RedisConnectionError | None:
    """None if ``reply`` (to ``ROLE``; None: not allowed to ask) lets the connection serve as
    the primary; else the error that makes redis-py's connect retry, with the sentinel that
    named the replica put last so that the retry asks another."""
    problem = None if reply is None else role_problem(reply, address, pool.service_name)
    if problem is None:
        return None
    sentinels = pool.sentinel_manager.sentinels
    sentinels.append(sentinels.pop(0))
    log.warning("%s", problem)
    return RedisConnectionError(problem)


def _cannot_tell(exc: NoPermissionError) -> None:
    """An ACL without ROLE (docs/security.md grants it): connect as redis-py would (no reply to
    judge), and say so once per process."""
    global _warned_no_role
    if not _warned_no_role:
        _warned_no_role = True
        log.warning(
            "the Redis ACL user may not run ROLE (%s), so a connection cannot check that it "
            "reached the primary during a failover: add +role to the user (docs/security.md)",
            exc,
        )


class PrimaryConnection(aiosentinel.SentinelManagedConnection):
    """An asyncio connection to the primary that the sentinels name, refused if it is not one."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        await super().connect_to(address)  # type: ignore[no-untyped-call]
        try:
            await self.send_command("ROLE")
            reply = await self.read_response()
        except NoPermissionError as exc:
            _cannot_tell(exc)
            reply = None
        refusal = _refusal(self.connection_pool, address, reply)
        if refusal is not None:
            await self.disconnect()
            raise refusal


class PrimarySSLConnection(PrimaryConnection, aioconnection.SSLConnection):
    pass


class BlockingPrimaryConnection(sentinel.SentinelManagedConnection):
    """:class:`PrimaryConnection` for synchronous callers (rq, the CLI).

    It also disconnects when a read is interrupted: redis-py's synchronous Sentinel connection
    by default keeps such a connection (unlike every other connection), and rq's worker,
    stopped by SIGTERM in the middle of its blocking dequeue, sent its last commands on it and
    waited for the dequeue's reply, 405 s."""

    def connect(self) -> None:
        """Connect as redis-py does, but try the sentinels' answer three times (a synchronous
        connection otherwise tries once: a replica refused would fail the command at once)."""
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
        retry.call_with_retry(self._connect_retry, lambda error: None)

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)  # type: ignore[no-untyped-call]
        try:
            self.send_command("ROLE")  # type: ignore[no-untyped-call]
            reply = self.read_response()  # type: ignore[no-untyped-call]
        except NoPermissionError as exc:
            _cannot_tell(exc)
            reply = None
        refusal = _refusal(self.connection_pool, address, reply)
        if refusal is not None:
            self.disconnect()  # type: ignore[no-untyped-call]
            raise refusal

    def read_response(  # type: ignore[no-untyped-def]
        self, disable_decoding=False, *, disconnect_on_error=True, **kwargs
    ):
        return super().read_response(
            disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs
        )


class BlockingPrimarySSLConnection(BlockingPrimaryConnection, connection.SSLConnection):
    pass
