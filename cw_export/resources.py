"""Where the project's data folders (``recipes/``, ``calibration/``) live for a checkout or an install.

A source checkout (and an editable install) keeps them at the repository root; a regular install ships them as
``data_files`` under ``<prefix>/share/cw_export/``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def data_dirs(name: str) -> tuple[Path, ...]:
    """Candidate folders for the data folder ``name``, in search order."""
    package_dir = Path(__file__).resolve().parent
    return (
        package_dir.parent / name,
        package_dir / name,
        Path(sys.prefix) / "share" / "cw_export" / name,
    )


def data_dir(name: str) -> Path:
    """The first existing candidate folder (or the checkout location, for error messages, if none exists)."""
    for candidate in data_dirs(name):
        if candidate.is_dir():
            return candidate
    return data_dirs(name)[0]
