"""``sage llm preset …``: list, show and apply presets."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
import yaml
from rich.table import Table
from rich.text import Text

from sage_mq.cli.common import (
    Column,
    JsonFlag,
    RedisUrl,
    console,
    fail,
    print_fitted,
    print_json,
    run,
    settings_for,
)
from sage_mq.cli.engine import show_progress
from sage_mq.control import ControlPlaneManager
from sage_mq.dryrun import Step, plan
from sage_mq.engines.env_policy import masked
from sage_mq.presets import BUILTIN_DIR, Preset, PresetError, builtin_names, load_preset
from sage_mq.scheduler.fleet import FleetView
from sage_mq.settings import Settings
from sage_mq.store import EngineRecord

preset_app = typer.Typer(help="Named sets of engines, started with one command.")
NameOrFile = Annotated[str, typer.Argument(help="A built-in preset's name, or a YAML file.")]


@preset_app.command("list")
def list_presets(json_output: JsonFlag = False) -> None:
    """The built-in presets (files in presets/)."""
    presets = [_load(name) for name in builtin_names()]
    if json_output:
        print_json([p.model_dump(mode="json", by_alias=True) for p in presets])
        return
    table = Table("PRESET", "ENGINES", "MODELS")
    for p in presets:
        models = ", ".join(f"{e.model} ({e.kind})" for e in p.engines)
        table.add_row(p.name, str(len(p.engines)), models)
    console.print(table)
    console.print(Text(f"from {BUILTIN_DIR}", style="dim"))


@preset_app.command("show")
def show(name: NameOrFile, json_output: JsonFlag = False) -> None:
    """A preset as YAML, with the engine id each engine gets (env values hidden)."""
    preset = _load(name)
    data = {
        "version": preset.version,
        **preset.model_dump(mode="json", exclude_defaults=True, by_alias=True),
    }
    data["engines"] = [{"name": e.pop("name"), **e} for e in data["engines"]]  # its name first
    for engine in data["engines"]:
        if "env" in engine:
            engine["env"] = masked(engine["env"])
    if json_output:
        print_json(data)
        return
    typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())
    for engine in preset.engines:
        typer.echo(f"# {engine.name} → engine id {preset.engine_id(engine)}")


@preset_app.command("apply")
def apply(
    name: NameOrFile,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show what it would do on the fleet as it is now (where each engine would go, "
            "or why it would not start); change nothing.",
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until every engine is RUNNING.")
    ] = True,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback/--no-rollback", help="Stop what was started if a later engine fails."
        ),
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each engine.")] = 1800.0,
    json_output: JsonFlag = False,
    redis_url: RedisUrl = None,
) -> None:
    """Start every engine of a preset (engines already running are left as they are)."""
    preset = _load(name)  # a bad file is refused here, before anything starts
    if dry_run:
        _dry_run(preset, settings_for(redis_url), json_output)
        return

    async def main() -> list[EngineRecord]:
        async with ControlPlaneManager(settings_for(redis_url)) as cp:
            return await cp.apply_preset(
                preset,
                wait=wait,
                rollback=rollback,
                timeout=timeout,
                on_event=None if json_output else show_progress,
            )

    records = run(main)
    if json_output:
        print_json([r.public() for r in records])
        return
    for r in records:
        console.print(f"{r.engine_id} {r.state.value} {r.url or ''}")


def _load(name: str) -> Preset:
    try:
        return load_preset(name)
    except PresetError as exc:
        fail(str(exc))


def _dry_run(preset: Preset, settings: Settings, json_output: bool) -> None:
    """The plan on the live fleet; exit 1 if an engine would not start."""

    async def look() -> list[Step]:
        async with ControlPlaneManager(settings) as cp:
            nodes = await FleetView(cp.store).live()
            existing = {r.engine_id: r for r in await cp.list_engines()}
        return plan(preset, nodes, existing)

    steps = run(look)
    refused = [s for s in steps if s.action == "refused"]
    if json_output:
        print_json(
            {"preset": preset.name, "ok": not refused, "engines": [asdict(s) for s in steps]}
        )
    else:
        rows: list[list[str | Text]] = [
            [
                s.engine_id,
                s.model,
                s.action,
                s.node or "-",
                ",".join(map(str, s.gpus)) or "-",
                str(s.port or "-"),
                s.reason or "",
            ]
            for s in steps
        ]
        print_fitted(_PLAN_COLUMNS, rows)
    if refused:
        first = refused[0]
        fail(f"preset {preset.name} would not start as the fleet is now: {first.engine_id}: "
             f"{first.reason}")  # fmt: skip
    if not json_output:
        console.print(f"preset {preset.name}: every engine would start (nothing was changed)")


_PLAN_COLUMNS = (
    Column("ENGINE"),
    Column("MODEL"),
    Column("ACTION"),
    Column("NODE"),
    Column("GPUS", 2),
    Column("PORT", 1),
    Column("WHY", 3),
)
