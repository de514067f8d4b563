"""All-or-nothing output folders.

A bundle is built in a temporary folder beside its destination, fsynced and renamed into place, so an interrupted
or failed build never leaves a partial bundle at ``--out``. Temporary folders of builds that were killed (their
process no longer exists) are removed by the next build into the same parent folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import InputError

TEMP_MARKER = ".cwtmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove leftovers of killed builds (``.<name>.cwtmp-<pid>-<id>``) whose process is gone."""
    removed = []
    for entry in parent.glob(f".*{TEMP_MARKER}*"):
        try:
            pid = int(entry.name.split(TEMP_MARKER, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse destinations we must not or cannot replace, before any work is done."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    if out.exists() and not overwrite:
        raise InputError(f"output folder already exists (use --overwrite to replace it): {out}")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"parent folder of the output does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder's parent is not writable: {parent}")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out``, on any exception it is removed.

    With ``overwrite`` an existing ``out`` is replaced only after the new folder is complete, so the old bundle
    survives a failed build.
    """
    out = Path(out).absolute()
    check_output_path(out, overwrite)
    clean_stale_temps(out.parent)
    tmp = out.parent / f".{out.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}{TEMP_MARKER}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write one file via temp + rename (used for files that live outside bundles, e.g. latents)."""
    tmp = path.parent / f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
