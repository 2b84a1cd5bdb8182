"""Every example and benchmark starts as a script: `python examples/x.py --help` works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

SCRIPTS = sorted(
    path
    for folder in ("examples", "benchmarks")
    for path in (REPO_ROOT / folder).glob("*.py")
    if path.name != "__init__.py" and "def main(" in path.read_text()
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_the_script_starts_and_prints_its_usage(script: Path) -> None:
    # Run as a script, the file's own folder leads sys.path: a file there named like a
    # standard-library module (collections.py did) breaks every import after it.
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
