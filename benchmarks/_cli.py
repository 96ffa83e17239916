"""What every benchmark's command line shares: its arguments' parser (with ``--out``, where its
JSON goes) and the end of a run (the JSON written, the figures printed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parser_for(doc: str | None, name: str) -> argparse.ArgumentParser:
    """A parser described by the script's first docstring line, with ``--out``
    (``benchmarks/results/<name>.json`` by default)."""
    parser = argparse.ArgumentParser(description=(doc or name).split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}.json"))
    return parser


def finish(figures: dict[str, Any], out: Path, show: Callable[[dict[str, Any]], None]) -> None:
    """Write the figures as JSON to ``out``, and print them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    show(figures)
    print(f"wrote {out}")
