"""Assertions and runners shared by the reliability battery (imported by its conftest and test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cw_export.atomic import TEMP_MARKER


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_user_error(result: CliResult, fragment: str) -> str:
    """Exit code 2, exactly one non-empty stderr line, no traceback, and ``fragment`` in that line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = error_lines(result.stderr)
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("cw-export: error: ") and fragment in lines[0], lines[0]
    return lines[0]


def temps_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if TEMP_MARKER in p.name) if Path(folder).is_dir() else []


def assert_nothing_written(folder: Path, before: set[str] | None = None) -> None:
    """``folder`` holds exactly the names it held before (default: nothing), so no output and no temp litter."""
    names = {p.name for p in Path(folder).iterdir()} if Path(folder).is_dir() else set()
    assert names == (before or set()), sorted(names ^ (before or set()))


SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}  # see conftest.one_torch_thread


def cw_subprocess(*args: str, env: dict | None = None, timeout: float = 300) -> CliResult:
    """The real console entry point in a fresh interpreter."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    done = subprocess.run([sys.executable, "-m", "cw_export.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)
