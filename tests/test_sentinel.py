"""Redis under Sentinel: the URL, and clients that follow the primary through a failover (a real
primary, replica and three sentinels; the primary killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq import UnifiedInferenceClient
from sage_mq.bus import Bus
from sage_mq.connection import check_server, connect, connect_blocking, server_address
from sage_mq.errors import ConfigError, ControlPlaneUnavailable
from sage_mq.keys import Keys
from sage_mq.messages import StopEngine
from sage_mq.records import EngineRecord, EngineState
from sage_mq.redis_urls import (
    check_redis_url,
    parse_sentinel_url,
    redact_url,
    url_secrets,
)
from sage_mq.settings import BusSettings, Settings
from sage_mq.spec import EngineSpec
from sage_mq.store import Store
from tests.helpers.events import recorder
from tests.helpers.sentinel import SERVICE, SentinelGroup
from tests.helpers.servers import Processes, RedisServer

T = TypeVar("T")


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_primary_s_credentials() -> None:
    where = parse_sentinel_url("redis+sentinel://fleet:p%40ss@h1:26379,h2,[::1]:26380/main/3")
    assert where.sentinels == (("h1", 26379), ("h2", 26379), ("::1", 26380))
    assert (where.service, where.db, where.username, where.password) == ("main", 3, "fleet", "p@ss")
    assert where.primary_kwargs() == {"db": 3, "username": "fleet", "password": "p@ss"}
    assert where.sentinel_kwargs(5) == {"socket_timeout": 5, "socket_connect_timeout": 5}
    tls = parse_sentinel_url(
        "rediss+sentinel://s1:26379/main?ssl_ca_certs=/ca.pem&sentinel_password=sp"
    )
    assert tls.primary_kwargs() == {
        "db": 0,
        "username": None,
        "password": None,
        "ssl": True,
        "ssl_ca_certs": "/ca.pem",
    }
    assert tls.sentinel_kwargs(1)["password"] == "sp" and tls.sentinel_kwargs(1)["ssl"] is True


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://u:hunter22@/main", "name at least one sentinel"),
        ("redis+sentinel://u:hunter22@h1:26379", "/<service>[/<db>]"),
        ("redis+sentinel://u:hunter22@h1:26379/main/zero", "/<service>[/<db>]"),
        ("redis+sentinel://u:hunter22@h1:port/main", "'h1:port' is not host:port"),
        ("redis+sentinel://u:hunter22@h1/main?timeout=3", "unknown option 'timeout'"),
        ("sentinel://h1/main", "redis+sentinel://"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_redis_url(url)
    assert says in str(refused.value) and "\n" not in str(refused.value)
    assert "hunter22" not in str(refused.value)


def test_passwords_in_a_sentinel_url_are_hidden_and_known_as_secrets() -> None:
    url = "redis+sentinel://fleet:pw-1@h1:26379,h2:26379/main/0?sentinel_password=spw-2"
    assert redact_url(url) == (
        "redis+sentinel://fleet:***@h1:26379,h2:26379/main/0?sentinel_password=***"
    )
    assert {"pw-1", "spw-2", url} <= set(url_secrets(url))
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.kill()


async def test_clients_follow_the_primary_through_a_failover(
    sentinel_group: SentinelGroup,
) -> None:
    settings = Settings(redis_url=sentinel_group.url, namespace="s")
    client = connect(settings)
    blocking = connect_blocking(settings, socket_timeout=2)
    try:
        await check_server(client)
        await client.set("s:before", "1")
        await client.execute_command("WAIT", 1, 2000)  # on the replica before the kill
        assert f"primary of '{SERVICE}' under Sentinel" in server_address(client)
        sentinel_group.kill_primary()
        assert await _retrying(lambda: client.get("s:before")) == "1"
        await _retrying(lambda: client.set("s:after", "2"))
        assert blocking.get("s:after") == b"2"
        assert f"127.0.0.1:{sentinel_group.replica.port}" in server_address(client)
    finally:
        await client.aclose()
        blocking.close()


async def test_a_blocked_stream_reader_carries_on_against_the_promoted_replica(
    sentinel_group: SentinelGroup,
) -> None:
    settings = Settings(
        redis_url=sentinel_group.url,
        namespace="s",
        bus=BusSettings(block_ms=200, claim_min_idle_ms=500),
    )
    client = connect(settings)
    bus = Bus(client, Keys(settings.namespace), settings.bus)
    seen, handler = recorder()
    consumer = bus.consumer(["s:requests"], "g", "c1", handler)
    task = asyncio.create_task(consumer.run())
    try:
        await bus.publish("s:requests", StopEngine(engine_id="before"))
        await _until(lambda: seen == ["before"])
        await client.execute_command("WAIT", 1, 2000)
        sentinel_group.kill_primary()
        await _retrying(lambda: bus.publish("s:requests", StopEngine(engine_id="after")))
        await _until(lambda: "after" in seen)
        assert seen == ["before", "after"]  # nothing handled twice
    finally:
        consumer.stop()
        await task
        await client.aclose()


async def _retrying(call: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """What ``call()`` gives once the connection has found the new primary."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except (ControlPlaneUnavailable, RedisConnectionError, RedisTimeoutError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no primary after {timeout:.0f} s: {exc}") from exc
        await asyncio.sleep(0.1)


async def _until(done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


def _waits(port: int) -> int:
    """How many WAIT commands the server at ``port`` has run."""
    with redis.Redis(port=port) as server:
        return int(server.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


async def test_durable_writes_wait_for_the_replica_and_carry_on_without_one(
    sentinel_group: SentinelGroup, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis_url=sentinel_group.url, namespace="s", replica_ack_timeout_ms=300)
    assert settings.replicas_to_wait_for == 1  # the default under Sentinel
    client = connect(settings)
    bus = Bus(client, Keys("s"), settings.bus)
    primary = sentinel_group.primary.port
    try:
        await bus.publish("s:requests", StopEngine(engine_id="a"))
        await bus.publish_many("s:requests", [StopEngine(engine_id="b"), StopEngine(engine_id="c")])
        assert _waits(primary) == 2  # one per round trip, on the connection that wrote
        assert sentinel_group.replica_has("s:requests", 3)
        store = Store(client, Keys("s"))
        assert await store.add_engine(EngineRecord.pending("e1", EngineSpec(model="m")))
        await store.update_engine("e1", state=EngineState.STARTING)
        assert _waits(primary) == 4  # a new record, a record's change

        sentinel_group.replica.pause()  # SIGSTOP: it acknowledges nothing
        started = time.monotonic()
        await bus.publish("s:requests", StopEngine(engine_id="d"))
        assert time.monotonic() - started >= 0.3
        assert "reached 0 of 1 replicas within 300 ms" in caplog.text
        started = time.monotonic()
        await bus.publish("s:requests", StopEngine(engine_id="e"))  # no waiting for a while
        assert time.monotonic() - started < 0.25 and _waits(primary) == 5
        sentinel_group.replica.resume()  # back: within a second, writes wait for it again
        await asyncio.sleep(1.1)
        await bus.publish("s:requests", StopEngine(engine_id="f"))  # the probe: it answers
        await bus.publish("s:requests", StopEngine(engine_id="g"))
        assert _waits(primary) == 7 and sentinel_group.replica_has("s:requests", 7)
    finally:
        sentinel_group.replica.resume()
        await client.aclose()


async def test_without_sentinel_nothing_waits_unless_asked(redis_server: RedisServer) -> None:
    plain = Settings(redis_url=redis_server.url, namespace=f"w{time.monotonic_ns()}")
    assert plain.replicas_to_wait_for == 0 and connect(plain).replica_acks is None
    asked = Settings.from_env({"SAGE_MQ_REDIS_URL": redis_server.url, "SAGE_MQ_REPLICA_ACKS": "2"})
    assert asked.replicas_to_wait_for == 2
    with pytest.raises(ConfigError, match="SAGE_MQ_REPLICA_ACKS must be a number"):
        Settings.from_env({"SAGE_MQ_REPLICA_ACKS": "all"})
    before = _waits(redis_server.port)
    client = connect(plain)
    await Bus(client, Keys(plain.namespace), plain.bus).publish(
        f"{plain.namespace}:s", StopEngine(engine_id="x")
    )
    await client.aclose()
    assert _waits(redis_server.port) == before


def test_the_python_client_reads_the_registry_through_the_sentinels(
    sentinel_group: SentinelGroup,
) -> None:
    client = UnifiedInferenceClient.create(control_plane_url=sentinel_group.url)
    try:
        assert client.models() == []  # an empty fleet, read from the primary the sentinels name
    finally:
        client.close()


def test_a_batch_worker_follows_a_failover_and_stops_at_once_on_sigterm(
    sentinel_group: SentinelGroup, processes: Processes
) -> None:
    """rq's blocking dequeue, interrupted by SIGTERM, must not leave its connection behind: the
    worker's last commands then waited for the dequeue's reply (405 s) under Sentinel."""
    env = {**os.environ, "SAGE_MQ_REDIS_URL": sentinel_group.url, "SAGE_MQ_NAMESPACE": "w"}
    worker = processes.sage("worker", ["llm", "worker", "run", "--name", "w1"], env)
    deadline = time.monotonic() + 30
    while b"Listening on" not in (processes.logdir / "worker.log").read_bytes():
        assert worker.poll() is None and time.monotonic() < deadline, processes.log("worker")
        time.sleep(0.1)
    with connect_blocking(Settings(redis_url=sentinel_group.url)) as client:
        beat = client.hget("rq:worker:w1", "last_heartbeat")
        sentinel_group.kill_primary()
        deadline = time.monotonic() + 60  # a heartbeat on the promoted replica: dequeuing again
        while _heartbeat(client) in (beat, None):  # (None too while no primary is named)
            assert time.monotonic() < deadline, processes.log("worker")
            time.sleep(0.2)
    time.sleep(1)  # in its blocking dequeue
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(10)
    assert code == 0, f"exit {code}\n{processes.log('worker')}"


def _heartbeat(client: redis.Redis) -> bytes | None:
    try:
        return client.hget("rq:worker:w1", "last_heartbeat")  # type: ignore[return-value]
    except redis.ConnectionError:  # the sentinels name no primary yet, or a stale one
        return None
