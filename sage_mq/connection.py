"""Making Redis clients, and turning Redis' exceptions into ours at the boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel as BlockingSentinel

from sage_mq.errors import ConfigError, ControlPlaneUnavailable
from sage_mq.redis_urls import check_redis_url, is_sentinel_url, parse_sentinel_url, redact_url
from sage_mq.replication import ReplicaAcks, acks_for
from sage_mq.sentinel_clients import (
    BlockingPrimaryConnection,
    BlockingPrimarySSLConnection,
    PrimaryConnection,
    PrimarySSLConnection,
)
from sage_mq.settings import Settings

Redis = aioredis.Redis


def connect(settings: Settings) -> Redis:
    """An asyncio Redis client with one reply shape (RESP2, str values) and fast failure.

    redis-py's default retry waits up to seconds per attempt; a control plane must notice an
    unreachable Redis quickly and let the caller decide, so retries are short and few. Under
    Sentinel (:mod:`sage_mq.redis_urls`) each connection asks the sentinels for the primary.
    """
    check_redis_url(settings.redis_url)
    options: dict[str, Any] = {
        "protocol": 2,
        "decode_responses": True,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
    }
    client: FleetRedis
    if is_sentinel_url(settings.redis_url):
        tls = parse_sentinel_url(settings.redis_url).tls
        options["connection_class"] = PrimarySSLConnection if tls else PrimaryConnection
        client = _primary(AsyncSentinel, SentinelRedis, settings, options)
    else:
        try:
            client = cast(FleetRedis, FleetRedis.from_url(settings.redis_url, **options))
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {redact_url(settings.redis_url)!r}: {exc}") from None
    client.replica_acks = acks_for(settings.replicas_to_wait_for, settings.replica_ack_timeout_ms)
    return client


def connect_blocking(settings: Settings, **given: Any) -> redis.Redis:
    """A synchronous client (bytes replies), as rq and the CLI's checks want: TLS, password and
    ACL from the URL, the primary found through Sentinel under a Sentinel URL. No read timeout
    unless ``options`` give one (rq sets one longer than its blocking dequeue)."""
    check_redis_url(settings.redis_url)
    options: dict[str, Any] = {"socket_connect_timeout": settings.socket_timeout_s}
    options |= {"health_check_interval": 30, **given}
    if is_sentinel_url(settings.redis_url):
        tls = parse_sentinel_url(settings.redis_url).tls
        options["connection_class"] = (
            BlockingPrimarySSLConnection if tls else BlockingPrimaryConnection
        )
        client: redis.Redis = _primary(BlockingSentinel, BlockingSentinelRedis, settings, options)
        return client
    try:
        return redis.Redis.from_url(settings.redis_url, **options)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(settings.redis_url)!r}: {exc}") from None


def _primary(
    sentinel_class: Any, redis_class: type, settings: Settings, options: dict[str, Any]
) -> Any:
    """The client of the primary that the URL's sentinels name, asked again on each connect."""
    where = parse_sentinel_url(settings.redis_url)
    sentinel_options = where.sentinel_kwargs(settings.socket_timeout_s)
    sentinel = sentinel_class(list(where.sentinels), sentinel_kwargs=sentinel_options)
    options = options | where.primary_kwargs()
    if "connection_class" in options:  # the pool picks its TLS class by "ssl" only without one
        options.pop("ssl", None)
    return sentinel.master_for(where.service, redis_class=redis_class, **options)


def _sentinels(client: Any) -> list[Any]:
    return list(client.connection_pool.sentinel_manager.sentinels)


class FleetRedis(aioredis.Redis):
    """The fleet's asyncio client: redis-py's, with how many replicas its durable writes wait
    for (:mod:`sage_mq.replication`)."""

    replica_acks: ReplicaAcks | None = None


class SentinelRedis(FleetRedis):
    """The primary's client under Sentinel; closing it also closes its sentinels' clients."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in _sentinels(self):
            await sentinel.aclose()


class BlockingSentinelRedis(redis.Redis):
    """:class:`SentinelRedis` for synchronous callers."""

    def close(self) -> None:
        super().close()
        for sentinel in _sentinels(self):
            sentinel.close()


MIN_SERVER_VERSION = (7, 0)
"""The oldest Redis the fleet runs on: its consumers claim stale entries with XAUTOCLAIM, whose
reply has three parts from 7.0 on (6.2's has two). Valkey, from 7.2, reports its own version."""


async def check_server(redis: Any) -> None:
    """Raise :class:`ConfigError`, in one line, if the server is older than
    :data:`MIN_SERVER_VERSION` (:class:`ControlPlaneUnavailable` if it cannot be reached)."""
    with redis_errors("asking the server its version"), _judging_hello(redis) as judge:
        judge(await redis.execute_command("HELLO"))


def check_server_blocking(redis: Any) -> None:
    """:func:`check_server` for a synchronous client (rq's worker, the CLI)."""
    with redis_errors("asking the server its version"), _judging_hello(redis) as judge:
        judge(redis.execute_command("HELLO"))


@contextmanager
def _judging_hello(redis: Any) -> Iterator[Callable[[Any], None]]:
    """What both checks share: the reply judged (:class:`ConfigError` if too old), a server
    without HELLO judged as one older than 6.0, and an ACL that refuses HELLO let through
    (nothing to judge by; the fleet's own commands will say)."""

    def judge(reply: Any) -> None:
        problem = server_problem(reply, server_address(redis))
        if problem is not None:
            raise ConfigError(problem)

    try:
        yield judge
    except NoPermissionError:
        return
    except ResponseError:  # HELLO came in 6.0
        judge(None)


def server_problem(hello: Sequence[Any] | Mapping[Any, Any] | None, where: str) -> str | None:
    """What is wrong with the server whose ``HELLO`` reply (a RESP3 map, a RESP2 list, None
    from a server without HELLO) this is, or None (pure)."""
    if isinstance(hello, Mapping):
        pairs = list(hello.items())
    else:
        pairs = list(zip(hello[::2], hello[1::2], strict=False)) if hello else []
    fields = {_text(k): _text(v) for k, v in pairs}
    name, version = str(fields.get("server", "redis")), str(fields.get("version", "older than 6.0"))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if len(numbers) == 2 and numbers >= MIN_SERVER_VERSION:
        return None
    return (
        f"the {name} server at {where} is version {version}; sage-mq needs Redis 7.0 or newer "
        "(or Valkey): upgrade it, or let `sage llm up` run its own (leave out --redis-url)"
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def server_address(redis: Any) -> str:
    """host:port (or the socket path) of a redis-py client, sync or asyncio; no credentials."""
    pool = redis.connection_pool
    if getattr(pool, "service_name", None):  # under Sentinel: the primary it found last
        found = getattr(pool, "master_address", None)
        where = f"{found[0]}:{found[1]}, " if found else ""
        return f"{where}primary of {pool.service_name!r} under Sentinel"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise :class:`ControlPlaneUnavailable` for a Redis that cannot be reached, or that
    refuses our ACL user what it needs (callers retry both: an operator can mend the ACL
    while the fleet waits); :class:`ConfigError` for a server that does not speak Redis."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise_if_cancelled()
        raise ControlPlaneUnavailable(f"Redis unreachable while {what}: {exc}") from exc
    except InvalidResponse as exc:
        raise ConfigError(
            f"what answered while {what} is not Redis ({exc}): check the URL's host and port"
        ) from None
    except NoPermissionError as exc:
        raise ControlPlaneUnavailable(
            f"Redis refused {what}: {exc}; the ACL user needs the fleet's keys "
            "(~<namespace>:*), rq's (~rq:*) and channels (&*): see docs/security.md"
        ) from exc


def raise_if_cancelled() -> None:
    """Raise CancelledError in a task that was cancelled but carries on.

    On Python 3.11 redis-py can lose a cancellation: it sends each command under
    ``asyncio.wait_for``, which returns the result and drops the cancellation when it arrives
    as the send completes (3.12 rewrote ``wait_for``), and a cancellation met by a read
    timeout can come back as a TimeoutError. The task still counts the request
    (``Task.cancelling()``), so a loop that runs until cancelled checks here at each turn,
    and every handler of "Redis unreachable" first: else whoever cancelled it waits for ever
    (``sage llm up`` stopped while a preset's engine started did, 1 time in ~10).
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop: a synchronous caller, nothing to cancel
        return
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
