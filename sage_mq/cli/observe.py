"""``sage llm status``, ``events`` and ``gpu``: looking at the fleet."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.table import Table

from sage_mq.cli.common import (
    JsonFlag,
    RedisUrl,
    console,
    fleet_for,
    print_json,
    run,
    settings_for,
)
from sage_mq.control import ControlPlaneManager
from sage_mq.engines.env_policy import masked
from sage_mq.errors import DecodeError
from sage_mq.redis_urls import redact_url
from sage_mq.wire import decode, to_json


def status(json_output: JsonFlag = False, redis_url: RedisUrl = None) -> None:
    """Engines by state, nodes alive, GPUs, stream backlogs."""

    settings, source = fleet_for(redis_url)

    async def main() -> dict[str, Any]:
        async with ControlPlaneManager(settings) as cp:
            return await cp.status()

    summary = run(main)
    if json_output:
        print_json(summary | {"redis": {"url": redact_url(settings.redis_url), "from": source}})
        return
    engines, nodes, gpus, streams = (summary[k] for k in ("engines", "nodes", "gpus", "streams"))
    states = ", ".join(f"{k} {v}" for k, v in sorted(engines["by_state"].items())) or "none"
    console.print(f"redis       {redact_url(settings.redis_url)} ({source})", soft_wrap=True)
    console.print(f"namespace   {summary['namespace']}")
    console.print(f"nodes       {nodes['alive']} alive of {nodes['total']}")
    console.print(f"gpus        {gpus['total']} ({gpus['memory_total_gib']} GiB)")
    console.print(f"engines     {engines['total']}: {states}")
    console.print(
        f"streams     requests {streams['requests']}, events {streams['events']}, "
        f"dead letters {streams['dead']}"
    )


def _hide_env(fields: dict[str, str]) -> dict[str, str]:
    """An event as it may be shown: the engine record an ``engine.adopted`` carries keeps its
    env values for the scheduler, not for a screen or a log."""
    try:
        data = json.loads(fields.get("data") or "{}")
    except json.JSONDecodeError:
        return fields
    record = data.get("record") if isinstance(data, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("env"), dict):
        return fields
    data["record"] = record | {"env": masked(record["env"])}
    return fields | {"data": json.dumps(data)}


def _event_line(entry_id: str, fields: dict[str, str]) -> str:
    try:
        env = decode(fields)
    except DecodeError as exc:
        return f"{entry_id} (undecodable: {exc})"
    when = datetime.datetime.fromtimestamp(env.ts).strftime("%H:%M:%S.%f")[:-3]
    data = to_json(env)["data"]
    detail = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("argv", "last_lines"))
    return f"{when} {env.type:<20} {detail}"


def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    count: Annotated[
        int, typer.Option("--count", "-n", min=0, help="How many past events (0: only new).")
    ] = 50,
    types: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            "-t",
            help="Only events of this type (repeat for more; `engine.` takes every engine.*).",
        ),
    ] = None,
    engine: Annotated[str | None, typer.Option(help="Only events about this engine.")] = None,
    json_output: JsonFlag = False,
    redis_url: RedisUrl = None,
) -> None:
    """Recent events from ``sage:events`` (every step of every engine), oldest first."""
    wanted = EventFilter(tuple(types or ()), engine)

    def show(entry_id: str, fields: dict[str, str]) -> None:
        fields = _hide_env(fields)
        if json_output:
            print_json({"entry_id": entry_id, **fields})
        else:
            typer.echo(_event_line(entry_id, fields))

    async def main() -> None:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            rows = await _newest_matching(cp, wanted, count)
            for entry_id, fields in rows:
                show(entry_id, fields)
            if follow:
                cursor = rows[-1][0] if rows else "$"
                async for entry_id, fields in cp.bus.tail(cp.keys.events, cursor):
                    if entry_id and wanted.takes(fields):
                        show(entry_id, fields)

    run(main)


@dataclass(frozen=True)
class EventFilter:
    """Which events ``events`` shows: of these types (a type ending in ``.`` takes all that
    begin with it), about this engine."""

    types: tuple[str, ...] = ()
    engine: str | None = None

    def takes(self, fields: dict[str, str]) -> bool:
        kind = fields.get("type", "")
        if self.types and not any(
            kind.startswith(t) if t.endswith(".") else kind == t for t in self.types
        ):
            return False
        if self.engine is None:
            return True
        try:
            data = json.loads(fields.get("data") or "{}")
        except json.JSONDecodeError:
            return False
        return isinstance(data, dict) and data.get("engine_id") == self.engine


_PAGE = 1000


async def _newest_matching(cp: ControlPlaneManager, wanted: EventFilter, count: int) -> list[Any]:
    """The newest ``count`` events ``wanted`` takes, oldest first: read back a page at a time
    (the stream is capped, so this ends)."""
    if count <= 0:
        return []
    found: list[Any] = []
    before = None
    size = _PAGE if wanted.types or wanted.engine else count
    while len(found) < count:
        page = await cp.bus.history(cp.keys.events, size, before=before)
        if not page:
            break
        found = [row for row in page if wanted.takes(row[1])] + found
        before = page[0][0]
    return found[-count:]


def gpu(json_output: JsonFlag = False, redis_url: RedisUrl = None) -> None:
    """GPUs of every node, with what the scheduler has reserved on each."""

    async def main() -> list[dict[str, Any]]:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.gpus()

    rows = run(main)
    if json_output:
        print_json(rows)
        return
    table = Table("NODE", "GPU", "NAME", "TOTAL GiB", "USED GiB", "RESERVED GiB", "ENGINES")
    for r in rows:
        node = r["node"] if r["alive"] else f"{r['node']} (down)"
        table.add_row(
            node,
            str(r["index"]),
            r["name"],
            str(r["memory_total_gib"]),
            str(r["memory_used_gib"]),
            str(r["reserved_gib"]),
            ", ".join(r["engines"]) or "-",
        )
    console.print(table if rows else "no GPUs in the fleet (nodes without GPUs run CPU engines)")
