"""The formatter and linter settings in pyproject.toml ([tool.ruff]) hold for the
whole tree: `ruff format --check` and `ruff check` both pass (ruff is pinned in
the [dev] extra, so the formatting does not change under a newer release)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff(args):
    result = subprocess.run(
        [sys.executable, "-m", "ruff"] + args + ["."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ruff {' '.join(args)} found:\n{result.stdout}{result.stderr}"
