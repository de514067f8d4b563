"""Runners shared by the reliability battery (imported by its conftest and test modules); the user-error assertions
are tests/user_errors.py."""

from __future__ import annotations

import os
import subprocess
import sys

from user_errors import CliResult


SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}  # see conftest.one_torch_thread


def cw_subprocess(*args: str, env: dict | None = None, timeout: float = 300) -> CliResult:
    """The real console entry point in a fresh interpreter."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    done = subprocess.run([sys.executable, "-m", "cw_export.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)
