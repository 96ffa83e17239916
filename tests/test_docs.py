"""The documentation builds as a site with no broken link or anchor, and the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 12 * 1024


def test_the_site_builds_strict_with_every_link_and_anchor_found(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "contract" / "index.html").is_file()


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_MAX_BYTES, "the README is a tour: move detail to docs/"
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the documentation"
    for target in local:
        assert (ROOT / target).exists(), f"README links to {target}, which is not there"


def test_the_documentation_names_the_contract_it_is_held_to() -> None:
    for path in (ROOT / "sage_mq").rglob("*.py"):
        assert "DESIGN.md" not in path.read_text(), f"{path}: the contract is docs/contract.md"
