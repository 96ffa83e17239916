"""Per-engine log files: rotation at spawn, copy-truncate when large, and reading the tail."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotate(path: Path, backups: int) -> None:
    """Shift ``log`` → ``log.1`` → … → ``log.N`` (dropping the oldest)."""
    if backups < 1 or not path.exists():
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def truncate_if_large(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate a live log over ``max_bytes`` (the engine appends, so it keeps writing)."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups >= 1:
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines of a file (decoded leniently); [] if it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]
