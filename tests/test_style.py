"""The codebase keeps one format (ruff format, 120 columns), has no unused or undefined names, and its type
hints check (mypy)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_code_is_formatted():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_unused_or_undefined_names():
    result = ruff("check", "--select", "F,E9", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_type_hints_check():
    """mypy (pinned in requirements-dev.txt, configured in pyproject.toml) finds no error in the package."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
