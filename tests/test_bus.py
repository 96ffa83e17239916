"""The bus on a real redis-server: delivery, redelivery, claiming, dead letters, idempotency."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import pytest

from sage_mq.agent.outbox import Outbox
from sage_mq.bus import DEAD_EXCERPT_CHARS, Bus
from sage_mq.connection import Redis, connect
from sage_mq.errors import ConfigError, ControlPlaneUnavailable
from sage_mq.keys import Keys
from sage_mq.messages import NodeHealth, StopEngine
from sage_mq.settings import BusSettings, Settings
from sage_mq.wire import Envelope, decode, envelope
from tests.helpers.events import recorder
from tests.helpers.servers import Processes, RedisServer


def make_bus(redis: Redis, settings: Settings) -> Bus:
    return Bus(redis, Keys(settings.namespace), settings.bus)


async def pending_count(redis: Redis, stream: str, group: str = "g") -> int:
    info: Any = await redis.xpending(stream, group)
    return int(info["pending"])


async def test_published_messages_are_delivered_in_order_and_acked(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    await bus.publish_many(stream, [StopEngine(engine_id=f"e{i}") for i in range(5)])
    await bus.publish(stream, StopEngine(engine_id="e5"))
    seen, handler = recorder()
    consumer = bus.consumer([stream], "g", "c1", handler)
    await consumer.run(until_idle=True)
    assert seen == [f"e{i}" for i in range(6)]
    assert await pending_count(aredis, stream) == 0
    assert consumer.handled == 6


async def test_one_consumer_reads_several_streams(aredis: Redis, settings: Settings) -> None:
    bus = make_bus(aredis, settings)
    a, b = f"{settings.namespace}:a", f"{settings.namespace}:b"
    await bus.publish(a, StopEngine(engine_id="from-a"))
    await bus.publish(b, StopEngine(engine_id="from-b"))
    seen, handler = recorder()
    await bus.consumer([a, b], "g", "c1", handler).run(until_idle=True)
    assert sorted(seen) == ["from-a", "from-b"]


async def test_the_same_message_id_twice_has_one_effect(aredis: Redis, settings: Settings) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    env = envelope(StopEngine(engine_id="once"))
    await bus.publish(stream, env)
    await bus.publish(stream, env)  # a client retrying after a lost reply
    seen, handler = recorder()
    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    assert seen == ["once"]
    assert await pending_count(aredis, stream) == 0


async def test_garbage_goes_to_dead_letters_at_once_and_the_loop_keeps_going(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    await aredis.xadd(stream, {"hello": "world"})
    await aredis.xadd(stream, {"type": "engine.stop", "data": "{oops", "id": "x1"})
    await bus.publish(stream, StopEngine(engine_id="fine"))
    seen, handler = recorder()
    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    assert seen == ["fine"]
    dead = await aredis.xrange(bus.keys.dead)
    assert len(dead) == 2
    reasons = [fields["reason"] for _id, fields in dead]
    assert "lacks field" in reasons[0] and "invalid engine.stop" in reasons[1]
    assert {fields["stream"] for _id, fields in dead} == {stream}
    assert json.loads(dead[0][1]["fields"]) == {"hello": "world"}
    assert await pending_count(aredis, stream) == 0


async def test_a_dead_letter_keeps_a_bounded_excerpt_of_a_huge_entry(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    await aredis.xadd(stream, {"type": "engine.stop", "data": "x" * 5_000_000, "id": "big"})
    seen, handler = recorder()
    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    ((_id, fields),) = await aredis.xrange(bus.keys.dead)
    assert len(fields["fields"]) == DEAD_EXCERPT_CHARS and len(fields["reason"]) <= 8192
    assert int(fields["fields_chars"]) > 5_000_000 and seen == []


async def test_a_failing_handler_is_retried_then_dead_lettered_after_max_deliveries(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)  # max_deliveries=3, claim_min_idle_ms=300
    stream = f"{settings.namespace}:s"
    await bus.publish(stream, StopEngine(engine_id="poison"))
    await bus.publish(stream, StopEngine(engine_id="good"))
    attempts: list[str] = []

    async def handler(env: Envelope) -> None:
        assert isinstance(env.payload, StopEngine)
        attempts.append(env.payload.engine_id)
        if env.payload.engine_id == "poison":
            raise RuntimeError("cannot handle this")

    consumer = bus.consumer([stream], "g", "c1", handler)
    task = asyncio.create_task(consumer.run())
    for _ in range(100):
        if await aredis.xlen(bus.keys.dead):
            break
        await asyncio.sleep(0.05)
    consumer.stop()
    await task
    assert attempts.count("poison") == 3 and attempts.count("good") == 1
    ((_id, fields),) = await aredis.xrange(bus.keys.dead)
    assert "delivery 3 of 3" in fields["reason"] and "cannot handle this" in fields["reason"]
    assert fields["deliveries"] == "3"
    assert await pending_count(aredis, stream) == 0


async def wait_for_list(redis: Redis, key: str, n: int, timeout: float = 15.0) -> list[str]:
    for _ in range(int(timeout / 0.05)):
        items: list[str] = await redis.lrange(key, 0, -1)
        if len(items) >= n:
            return items
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never had {n} items")


async def kill_consumer_mid_handling(
    redis: Redis, server: RedisServer, processes: Processes, stream: str, name: str
) -> list[str]:
    """Run a consumer process until it is inside its handler, then SIGKILL it; the ids it had."""
    namespace = stream.split(":", 1)[0]
    argv = [
        sys.executable,
        "-m",
        "tests.helpers.stuck_consumer",
        server.url,
        namespace,
        stream,
        name,
    ]
    proc = processes.start(f"stuck-{name}", argv, dict(os.environ))
    started = await wait_for_list(redis, f"{namespace}:test:started", 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)
    return started


async def test_an_entry_of_a_consumer_killed_mid_handling_is_redelivered_to_it_on_restart(
    aredis: Redis, settings: Settings, redis_server: RedisServer, processes: Processes
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    env = envelope(StopEngine(engine_id="mid-flight"))
    await bus.publish(stream, env)
    started = await kill_consumer_mid_handling(aredis, redis_server, processes, stream, "c1")
    assert started == [env.id]
    assert await pending_count(aredis, stream) == 1
    seen, handler = recorder()  # the same consumer name, back after a crash
    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    assert seen == ["mid-flight"]
    assert await pending_count(aredis, stream) == 0


async def test_entries_of_a_dead_consumer_are_claimed_by_another_after_min_idle(
    aredis: Redis, settings: Settings, redis_server: RedisServer, processes: Processes
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    await bus.publish(stream, StopEngine(engine_id="orphan"))
    await kill_consumer_mid_handling(aredis, redis_server, processes, stream, "dead")
    seen, handler = recorder()
    other = bus.consumer([stream], "g", "survivor", handler)  # claims after 300 ms idle
    task = asyncio.create_task(other.run())
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    other.stop()
    await task
    assert seen == ["orphan"]
    detail: Any = await aredis.xpending_range(stream, "g", "-", "+", 10)
    assert detail == []  # acked by the survivor


@pytest.mark.parametrize("learns", ["deposed", "lease lapsed"])
async def test_a_consumer_stopped_mid_batch_hands_the_rest_to_the_next_at_once(
    aredis: Redis, settings: Settings, learns: str
) -> None:
    slow = Settings(redis_url=settings.redis_url, namespace=settings.namespace,
                    bus=BusSettings(block_ms=100, claim_min_idle_ms=60_000))  # fmt: skip
    bus = make_bus(aredis, slow)
    stream = f"{settings.namespace}:s"
    await bus.publish_many(stream, [StopEngine(engine_id=f"e{i}") for i in range(4)])
    seen, record = recorder()
    leading = [True]

    async def leader(env: Envelope) -> None:
        await record(env)
        if learns == "deposed":  # told by its lease keeper
            first.stop()
        else:  # its lease may have lapsed meanwhile: its gate closes, it stops by itself
            leading[0] = False

    first = bus.consumer([stream], "g", "old-leader", leader, gate=lambda: leading[0])
    await asyncio.wait_for(first.run(), 10)
    assert seen == ["e0"] and await pending_count(aredis, stream) == 3
    successor = bus.consumer([stream], "g", "new-leader", record)  # no takeover: min idle 60 s
    await successor.run(until_idle=True)
    assert seen == ["e0", "e1", "e2", "e3"] and await pending_count(aredis, stream) == 0


async def test_urgent_entries_go_ahead_of_a_long_batch_of_others(
    aredis: Redis, settings: Settings
) -> None:
    """A request that comes while the scheduler works through a batch of events (a flood of
    health reports) is handled a few milliseconds later, not after the whole batch."""
    bus = make_bus(aredis, settings)
    events, requests = f"{settings.namespace}:events", f"{settings.namespace}:requests"
    await bus.publish_many(events, [StopEngine(engine_id=f"ev{i}") for i in range(40)])
    seen: list[str] = []

    async def handle(env: Envelope) -> None:
        engine_id = env.payload.model_dump()["engine_id"]
        seen.append(engine_id)
        if engine_id == "ev1":  # the batch is under way: a request comes
            await bus.publish(requests, StopEngine(engine_id="urgent"))
        await asyncio.sleep(0.002)  # each event takes a while

    consumer = bus.consumer([requests, events], "g", "c1", handle, urgent=requests)
    await consumer.run(until_idle=True)
    assert sorted(seen) == sorted([*(f"ev{i}" for i in range(40)), "urgent"])
    assert seen.index("urgent") <= 4, seen  # not after the 40 events read with it
    assert await pending_count(aredis, events) == await pending_count(aredis, requests) == 0


async def test_block_time_must_stay_below_the_socket_timeout(settings: Settings) -> None:
    slow = Settings(redis_url=settings.redis_url, bus=BusSettings(block_ms=6000))
    redis = connect(slow)
    with pytest.raises(ConfigError, match="socket timeout"):
        Bus(redis, Keys(), slow.bus)
    await redis.aclose()


async def test_an_unreachable_redis_is_our_error_not_redis_pys(settings: Settings) -> None:
    from tests.helpers.servers import free_port

    gone = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=2.0)
    redis = connect(gone)
    with pytest.raises(ControlPlaneUnavailable, match="Redis unreachable"):
        await Bus(redis, Keys()).publish("s", StopEngine(engine_id="e"))
    await redis.aclose()


async def test_a_consumer_survives_a_redis_restart_that_lost_its_group(
    private_redis: RedisServer,
) -> None:
    settings = Settings(
        redis_url=private_redis.url,
        namespace="r",
        bus=BusSettings(block_ms=100, claim_min_idle_ms=300),
    )
    redis = connect(settings)
    bus = make_bus(redis, settings)
    seen, handler = recorder()
    consumer = bus.consumer(["r:s"], "g", "c1", handler)
    task = asyncio.create_task(consumer.run())
    await bus.publish("r:s", StopEngine(engine_id="before"))
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    private_redis.kill()
    private_redis.start()  # no persistence: streams and groups are gone
    for _ in range(200):
        try:
            await bus.publish("r:s", StopEngine(engine_id="after"))
            break
        except ControlPlaneUnavailable:
            await asyncio.sleep(0.05)
    for _ in range(200):
        if "after" in seen:
            break
        await asyncio.sleep(0.05)
    consumer.stop()
    await task
    await redis.aclose()
    assert seen == ["before", "after"]


async def test_messages_a_handler_returns_are_published_with_its_ack_exactly_once(
    aredis: Redis, settings: Settings
) -> None:
    from sage_mq.messages import NodeLost
    from sage_mq.wire import decode

    bus = make_bus(aredis, settings)
    stream, out = f"{settings.namespace}:s", f"{settings.namespace}:out"
    env = envelope(StopEngine(engine_id="e"))
    await bus.publish(stream, env)
    await bus.publish(stream, env)  # a duplicate id: its result must not be published again

    async def handler(got: Envelope) -> list[tuple[str, NodeLost]]:
        return [(out, NodeLost(node_id="n"))]

    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    rows = await aredis.xrange(out)
    assert [decode(fields).type for _id, fields in rows] == ["node.lost"]
    assert await pending_count(aredis, stream) == 0


async def test_redis_trouble_inside_a_handler_is_retried_and_never_dead_letters(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)  # max_deliveries=3
    stream = f"{settings.namespace}:s"
    await bus.publish(stream, StopEngine(engine_id="e"))
    attempts = 0

    async def handler(env: Envelope) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 4:
            raise ControlPlaneUnavailable("Redis unreachable while testing")

    consumer = bus.consumer([stream], "g", "c1", handler)
    task = asyncio.create_task(consumer.run())
    for _ in range(200):
        if consumer.handled:
            break
        await asyncio.sleep(0.05)
    consumer.stop()
    await task
    assert attempts == 5 and consumer.handled == 1
    assert await aredis.xlen(bus.keys.dead) == 0


async def test_a_consumer_started_before_redis_waits_for_it(private_redis: RedisServer) -> None:
    settings = Settings(redis_url=private_redis.url, namespace="w", bus=BusSettings(block_ms=100))
    private_redis.kill()
    redis = connect(settings)
    bus = make_bus(redis, settings)
    seen, handler = recorder()
    consumer = bus.consumer(["w:s"], "g", "c1", handler)
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    private_redis.start()
    await bus.publish("w:s", StopEngine(engine_id="late"))
    for _ in range(200):
        if seen:
            break
        await asyncio.sleep(0.05)
    consumer.stop()
    await task
    await redis.aclose()
    assert seen == ["late"]


async def test_a_trimming_consumer_leaves_only_what_is_not_yet_carried_out(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:commands"
    await bus.publish_many(stream, [StopEngine(engine_id=f"e{i}") for i in range(4)])

    async def fail_on_e2(env: Envelope) -> None:
        assert isinstance(env.payload, StopEngine)
        if env.payload.engine_id == "e2":
            raise RuntimeError("not now")

    await bus.consumer([stream], "g", "c1", fail_on_e2, trim=True).run(until_idle=True)
    left = [json.loads(f["data"])["engine_id"] for _id, f in await aredis.xrange(stream)]
    assert left == ["e2", "e3"]  # e2 failed (pending, retried later): nothing from it on goes
    seen, handler = recorder()
    await asyncio.sleep(settings.bus.claim_min_idle_ms / 1000 + 0.1)
    await bus.consumer([stream], "g", "c1", handler, trim=True).run(until_idle=True)
    assert seen == ["e2"] and await aredis.xlen(stream) == 0
    await bus.publish(stream, StopEngine(engine_id="e4"))  # trimming never eats new entries
    await bus.consumer([stream], "g", "c1", handler, trim=True).run(until_idle=True)
    assert seen == ["e2", "e4"] and await aredis.xlen(stream) == 0


async def test_a_broadcast_is_one_entry_in_every_stream(aredis: Redis, settings: Settings) -> None:
    bus = make_bus(aredis, settings)
    streams = [f"{settings.namespace}:n{i}" for i in range(1500)]  # more than one chunk
    await bus.broadcast(streams, StopEngine(engine_id="all"))
    rows = [await aredis.xrange(s) for s in (streams[0], streams[999], streams[1499])]
    assert all(len(r) == 1 for r in rows)
    assert len({r[0][1]["id"] for r in rows}) == 1  # the same message everywhere
    assert decode(rows[0][0][1]).payload == StopEngine(engine_id="all")


async def test_periodic_messages_leave_no_idempotency_marker(
    aredis: Redis, settings: Settings
) -> None:
    bus = make_bus(aredis, settings)
    stream = f"{settings.namespace}:s"
    health = envelope(NodeHealth(node_id="n1", results={"e": True}))
    stop = envelope(StopEngine(engine_id="e"))
    await bus.publish_many(stream, [health, stop, health])  # a re-sent report is handled again
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.type)

    await bus.consumer([stream], "g", "c1", handler).run(until_idle=True)
    assert seen == ["node.health", "engine.stop", "node.health"]
    markers = [k async for k in aredis.scan_iter(match=f"{settings.namespace}:done:*")]
    assert markers == [Keys(settings.namespace).processed("g", stop.id)]


async def test_concurrent_flushes_of_an_outbox_send_each_event_once_in_order(
    aredis: Redis, settings: Settings
) -> None:
    """The heartbeat flushes while a handler sends: both used to publish the first event and
    both pop, losing the next event or raising IndexError (which ended the heartbeat task)."""
    bus = make_bus(aredis, settings)
    outbox = Outbox(bus, f"{settings.namespace}:out")
    for i in range(3):
        outbox.pending.append(envelope(StopEngine(engine_id=f"queued-{i}")))
    sends = [outbox.send(StopEngine(engine_id=f"sent-{i}")) for i in range(20)]
    await asyncio.gather(outbox.flush(), outbox.flush(), *sends)
    published = [decode(f).payload for _id, f in await aredis.xrange(outbox.stream)]
    assert [p.engine_id for p in published if isinstance(p, StopEngine)] == [
        *(f"queued-{i}" for i in range(3)),
        *(f"sent-{i}" for i in range(20)),
    ]
    assert not outbox.pending
