"""The code style CI enforces: ruff's formatter and linter, configured in pyproject.toml, over the
library, tests, scripts, benchmarks and infra (fix with `ruff format . && ruff check --fix .`)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_format_leaves_every_file_as_it_is():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, f"ruff format would change files:\n{result.stdout}{result.stderr}"


def test_ruff_check_finds_nothing():
    result = _ruff("check", ".")
    assert result.returncode == 0, f"ruff check:\n{result.stdout}{result.stderr}"
