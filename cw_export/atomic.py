"""All-or-nothing output folders.

A bundle is built in a temporary folder beside its destination, fsynced and renamed into place, so an interrupted
or failed build never leaves a partial bundle at ``--out``. Temporary folders of builds that were killed (their
process no longer exists) are removed by the next build into the same parent folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from .errors import InputError

TEMP_MARKER = ".cwtmp-"
OLD_TAG = "old-"  # ``.<name>.cwtmp-<pid>-old-<id>``: a replaced folder moved aside (fallback path of the swap)
PAUSE_ENV = "CW_EXPORT_TEST_PAUSE_AT"


def pause_point(stage: str) -> None:
    """Test hook: with ``CW_EXPORT_TEST_PAUSE_AT=<stage>`` set, say so on stderr and sleep here (up to 10 minutes)
    so a test can signal the process at a known stage (tests/reliability/test_interrupts.py). Stages: ``load``,
    ``export``, ``manifest`` (build.py), ``rename`` (between the two renames of ``atomic_directory``) and ``write``
    (``write_file_atomic``, its temporary file written). Unset: no-op.
    """
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"cw-export: test pause at {stage} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(600)


class Terminated(BaseException):
    """SIGTERM raised as an exception, as SIGINT raises KeyboardInterrupt, so that the cleanup of ``atomic_directory``
    and ``write_file_atomic`` runs instead of leaving ``.<out>.cwtmp-PID-*`` beside the destination."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` (main thread only; elsewhere a no-op). A second SIGTERM during the
    cleanup ends the process at once, as the default handler would: a stuck cleanup can still be stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def final_path(path: str | os.PathLike) -> str:
    """Where a path inside a temporary folder will live once renamed into place (for one-line error messages)."""
    parts = list(Path(path).parts)
    for i, part in enumerate(parts):
        if part.startswith(".") and TEMP_MARKER in part:
            parts[i] = part[1:].split(TEMP_MARKER, 1)[0]
    return str(Path(*parts)) if parts else str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove leftovers of killed builds (``.<name>.cwtmp-<pid>-<id>``) whose process is gone.

    A replaced folder that a killed process had moved aside (``-old-``) while its destination is missing is renamed
    back instead: the old bundle survives a build killed between the two renames of the swap's fallback path.
    """
    removed = []
    for entry in sorted(Path(parent).glob(f".*{TEMP_MARKER}*")):
        try:
            rest = entry.name.split(TEMP_MARKER, 1)[1]
            pid = int(rest.split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid):
            continue
        destination = entry.parent / entry.name[1:].split(TEMP_MARKER, 1)[0]
        if rest.split("-", 1)[-1].startswith(OLD_TAG) and entry.is_dir() and not os.path.lexists(destination):
            os.replace(entry, destination)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at the existing ``out``; at no instant is ``out`` missing or partial.

    Preferred: one atomic exchange, then the old folder (now at ``tmp``) is deleted. Fallback: move ``out`` aside
    (``-old-``), move ``tmp`` in; a process killed between the two renames has its old folder restored by the next
    ``clean_stale_temps``, and a failed second rename puts it back at once.
    """
    if _exchange(tmp, out):
        pause_point("rename")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}{TEMP_MARKER}{os.getpid()}-{OLD_TAG}{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        pause_point("rename")
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out``, on any exception it is removed.

    With ``overwrite`` an existing ``out`` is replaced only after the new folder is complete, so the old bundle
    survives a failed build.
    """
    out = Path(out).absolute()
    clean_stale_temps(out.parent)  # first: it may restore an ``out`` that a killed swap had moved aside
    check_output_path(out, overwrite)
    tmp = out.parent / f".{out.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            if not overwrite:  # appeared while we built (another process): never replace it unasked
                raise InputError(f"output folder already exists (use --overwrite to replace it): {out}")
            _replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(out)  # e.g. a full disk under torch.onnx.export: name the folder being written
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write one file via temp + rename (used for files that live outside bundles, e.g. latents)."""
    clean_stale_temps(path.parent)
    tmp = path.parent / f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        pause_point("write")
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise
