"""The ``sage`` / ``sage-mq`` command line: ``sage llm …`` for operators and every actor."""

from __future__ import annotations

import typer

from sage_mq.cli.actors import node_app, scheduler_app
from sage_mq.cli.ask import chat
from sage_mq.cli.engine import engine_app
from sage_mq.cli.gateway import gateway_app
from sage_mq.cli.observe import events, gpu, status
from sage_mq.cli.preset import preset_app
from sage_mq.cli.up import up
from sage_mq.cli.worker import worker_app

app = typer.Typer(
    help="sage-mq: a control plane for fleets of LLM and embedding engines, on Redis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
llm_app = typer.Typer(help="Engines, nodes and the actors that run them.", no_args_is_help=True)
app.add_typer(llm_app, name="llm")
llm_app.add_typer(engine_app, name="engine", no_args_is_help=True)
llm_app.add_typer(scheduler_app, name="scheduler", no_args_is_help=True)
llm_app.add_typer(node_app, name="node", no_args_is_help=True)
llm_app.add_typer(preset_app, name="preset", no_args_is_help=True)
llm_app.add_typer(gateway_app, name="gateway", no_args_is_help=True)
llm_app.add_typer(worker_app, name="worker", no_args_is_help=True)
llm_app.command("up")(up)
llm_app.command("status")(status)
llm_app.command("events")(events)
llm_app.command("gpu")(gpu)
llm_app.command("chat")(chat)


def main() -> None:
    """Console-script entry point."""
    app()
