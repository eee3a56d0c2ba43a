"""The benchmark scripts stay runnable: each starts (``--help``), and every ``cli.<name>`` they call
exists (a module split once left two of them calling a function the package no longer exported,
which only showed when someone ran them)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO

from noisystudent import cli

SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if "def main" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_starts_and_calls_only_what_the_cli_exports(script):
    used = {
        node.attr
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cli"
    }
    assert not [name for name in used if not hasattr(cli, name)], f"{script.name} calls what noisystudent.cli lacks"
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-800:]
