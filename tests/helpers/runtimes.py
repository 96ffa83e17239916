"""Stand-in engine runtimes: real venvs whose engine packages are empty modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def venv_with(folder: Path, *packages: tuple[str, str]) -> str:
    """A real venv (no pip) in ``folder`` holding stand-ins for engine packages, given as
    (module, version); its interpreter's path. Enough for ``--runtime`` detection, not to serve."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    for module, version in packages:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text("")
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        metadata = f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n"
        (info / "METADATA").write_text(metadata)
        (info / "top_level.txt").write_text(f"{module}\n")
    return str(venv / "bin" / "python")
