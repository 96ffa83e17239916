"""Making Redis clients, and turning Redis' exceptions into ours at the boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq.errors import ConfigError, ControlPlaneUnavailable
from sage_mq.settings import Settings

Redis = aioredis.Redis


def connect(settings: Settings) -> Redis:
    """An asyncio Redis client with one reply shape (RESP2, str values) and fast failure.

    redis-py's default retry waits up to seconds per attempt; a control plane must notice an
    unreachable Redis quickly and let the caller decide, so retries are short and few.
    """
    try:
        return aioredis.Redis.from_url(
            settings.redis_url,
            protocol=2,
            decode_responses=True,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(settings.redis_url)!r}: {exc}") from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{user}:***@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise :class:`ControlPlaneUnavailable` for a Redis that cannot be reached, or that
    refuses our ACL user what it needs (callers retry both: an operator can mend the ACL
    while the fleet waits)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise_if_cancelled()
        raise ControlPlaneUnavailable(f"Redis unreachable while {what}: {exc}") from exc
    except NoPermissionError as exc:
        raise ControlPlaneUnavailable(
            f"Redis refused {what}: {exc}; the ACL user needs the fleet's keys "
            "(~<namespace>:*), rq's (~rq:*) and channels (&*): see docs/security.md"
        ) from exc


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that arrived as a timeout.

    On Python 3.11, a task cancelled while a read timeout fires inside redis-py can see a
    TimeoutError instead of CancelledError; a loop that retries on timeouts would then never
    stop. Every handler of "Redis unreachable" calls this first.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
