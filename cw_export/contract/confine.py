"""Confinement: every file read from a bundle is a regular file inside it, reached without following a symlink.

A bundle is untrusted input whose sender can recompute every sha256 (``manifest_bytes`` re-signs any dict), so a
hash cannot keep a reader inside the bundle; this module does, for every reader (manifest, tokenizer, graphs and
their external data, encodings, the integrity walk). ``bundle_parts`` is the one rule for a path in the manifest
(schema.py applies it to every path field when the manifest is read, ``open_inside`` again when a file is opened).

``open_inside`` opens the file one component at a time from a descriptor of the bundle folder, each
``os.open(part, O_NOFOLLOW, dir_fd=parent)``, and fstat-s what it opened. So a symlink anywhere inside the bundle
fails the open itself instead of being followed, and the caller reads the very file that passed (a descriptor,
never a name looked up again): swapping a folder for a symlink at any moment cannot redirect the read (the lstat
before each open only words the message). With no '..' and no link followed, the file lies under the bundle folder
by construction. Callers read the bytes once and use those (``read_inside``, ``map_inside``), rather than checking a
path and handing it on. The bundle folder itself is the user's choice and may be reached through symlinks. Needs
``os.open`` with ``dir_fd`` (Linux, macOS).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import BundleError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in a bundle must not block the open
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC


class MissingFile(BundleError):
    """The path is inside the bundle, but no file is there."""


def bundle_parts(rel: object) -> tuple[str, ...] | None:
    """The components of ``rel`` when it is a relative POSIX path inside a bundle, else None: absolute paths, '..',
    '.', empty components, backslashes, drive colons and NUL are refused (they mean other things on other systems)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or any(c in rel for c in "\\:\0"):
        return None
    parts = tuple(rel.split("/"))
    return None if any(p in ("", ".", "..") for p in parts) else parts


def _open_fd(bundle: Path, rel: str) -> int:
    """A descriptor of the regular file ``rel`` under ``bundle``; each component is looked at (lstat, for the
    message) and then opened with O_NOFOLLOW relative to its parent, so a link swapped in after the look fails the
    open instead of being followed, and fstat confirms what was opened."""
    parts = bundle_parts(rel)
    if parts is None:
        raise BundleError(f"{bundle}: {rel!r:.80} is not a path inside the bundle")
    try:
        fd = os.open(bundle, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise BundleError(f"bundle folder cannot be opened: {bundle} ({os.strerror(exc.errno or 0)})") from None
    try:
        for index, part in enumerate(parts):
            last, shown = index == len(parts) - 1, "/".join(parts[:index + 1])
            kind, is_kind = ("regular file", stat.S_ISREG) if last else ("folder", stat.S_ISDIR)
            try:
                mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise BundleError(f"{bundle}: cannot read {rel}: {shown} is a symbolic link (links in a bundle "
                                      "are not followed)")
                if not is_kind(mode):
                    raise BundleError(f"{bundle}: cannot read {rel}: {shown} is not a {kind}")
                child = os.open(part, (os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK) if last else _DIR_FLAGS,
                                dir_fd=fd)
            except FileNotFoundError:
                raise MissingFile(f"{bundle}: missing file: {rel}") from None
            except OSError as exc:
                raise BundleError(f"{bundle}: cannot read {rel}: {shown}: {os.strerror(exc.errno or 0)}") from None
            os.close(fd)
            fd = child
            if not is_kind(os.fstat(fd).st_mode):  # replaced between the look and the open
                raise BundleError(f"{bundle}: cannot read {rel}: {shown} is not a {kind}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_inside(bundle: str | os.PathLike, rel: str, missing_ok: bool = False) -> BinaryIO | None:
    """The regular file ``rel`` of ``bundle``, opened for reading without following any link (module docstring);
    a BundleError naming the path otherwise (None instead for a missing file with ``missing_ok``)."""
    try:
        return os.fdopen(_open_fd(Path(bundle), rel), "rb")
    except MissingFile:
        if missing_ok:
            return None
        raise


def read_inside(bundle: str | os.PathLike, rel: str, missing_ok: bool = False,
                limit: int | None = None) -> bytes | None:
    """The bytes of ``open_inside(bundle, rel)``: read once, so what a caller checks is what it uses. ``limit``:
    larger files are refused before they are read."""
    handle = open_inside(bundle, rel, missing_ok)
    if handle is None:
        return None
    with handle:
        if limit is not None and os.fstat(handle.fileno()).st_size > limit:
            raise BundleError(f"{bundle}: {rel} is larger than {limit >> 20} MiB")
        return handle.read()


def map_inside(bundle: str | os.PathLike, rel: str) -> mmap.mmap | bytes:
    """``open_inside``'s file mapped read-only (large ONNX external data, without a copy in this process)."""
    with open_inside(bundle, rel) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def sha256_handle(handle: BinaryIO) -> str:
    """sha256 of what is left to read in ``handle`` (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def walk_bundle(bundle: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(regular files, symlinks and other non-regular entries) under ``bundle`` as POSIX relative paths, sorted.

    Each folder is listed from a descriptor opened with O_NOFOLLOW relative to its parent's, so no link is followed
    even when one is swapped in during the walk: a symlinked folder is one entry and nothing behind it is listed."""
    files, odd = [], []
    pending = [("", os.open(bundle, os.O_RDONLY | _DIRECTORY | _CLOEXEC))]
    try:
        while pending:
            prefix, fd = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        rel = f"{prefix}{entry.name}"
                        if entry.is_dir(follow_symlinks=False):
                            try:
                                pending.append((f"{rel}/", os.open(entry.name, _DIR_FLAGS, dir_fd=fd)))
                            except OSError:  # replaced by a link since it was listed
                                odd.append(rel)
                        elif entry.is_file(follow_symlinks=False):
                            files.append(rel)
                        else:
                            odd.append(rel)
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)
    return sorted(files), sorted(odd)
