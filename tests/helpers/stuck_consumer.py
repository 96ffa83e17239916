"""A bus consumer process whose handler records each message, then never returns (to be killed)."""

from __future__ import annotations

import asyncio
import sys

from sage_mq.bus import Bus
from sage_mq.connection import connect
from sage_mq.keys import Keys
from sage_mq.settings import BusSettings, Settings
from sage_mq.wire import Envelope


async def main(url: str, namespace: str, stream: str, name: str) -> None:
    settings = Settings(
        redis_url=url, namespace=namespace, bus=BusSettings(block_ms=100, claim_min_idle_ms=60_000)
    )
    redis = connect(settings)
    bus = Bus(redis, Keys(namespace), settings.bus)

    async def handler(env: Envelope) -> None:
        await redis.rpush(f"{namespace}:test:started", env.id)
        await asyncio.Event().wait()  # stuck until SIGKILL

    await bus.consumer([stream], "g", name, handler).run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
