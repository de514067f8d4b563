"""The README's user-error contract as assertions shared by the tests: every user error prints one line on stderr
(``cw-export: error: ...``), exits with code 2, shows no traceback, and leaves nothing at the output path.

Importable from every test folder (tests/conftest.py puts tests/ on sys.path). A result is anything with
``returncode``, ``stdout`` and ``stderr``: a ``subprocess.CompletedProcess`` or a ``CliResult`` of an in-process call.
"""

from __future__ import annotations

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


def assert_user_error(result, fragment: str) -> str:
    """Exit code 2, exactly one non-empty stderr line, no traceback, and ``fragment`` in that line (returned)."""
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


def assert_refused(result, fragment: str, folder: Path, before: set[str] | None = None) -> str:
    """The whole contract: ``assert_user_error`` and ``folder`` (where the output would have gone) left holding
    exactly ``before``; returns the error line."""
    line = assert_user_error(result, fragment)
    assert_nothing_written(folder, before)
    return line
