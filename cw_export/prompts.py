"""Reading calibration prompt files.

Calibration quality depends on the prompts run through the model, so prompt files are read strictly: a file that is
missing, binary, empty or huge is a user error (``PromptFileError``, one line naming the path) rather than something
to guess around. The normalised prompt list is hashed so manifests can record exactly which prompts calibrated a bundle.

File format: UTF-8 text (a leading BOM is ignored), one prompt per line. Each line is stripped of surrounding
whitespace; blank lines and lines starting with ``#`` are skipped; order is kept; exact duplicates are dropped,
keeping the first occurrence.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cw_export.errors import PromptFileError
from cw_export.resources import data_dirs

MAX_PROMPT_FILE_BYTES: int = 4 * 1024 * 1024
"""Largest prompt file accepted; far above any sensible calibration set, so a larger file is almost surely a mistake."""

BUILTIN_PROMPT_SETS: dict[str, str] = {
    "default": "default.txt",
    "heldout": "heldout.txt",
    "shapes-train": "shapes_train.txt",  # the built-in shapes model's own captions (its cw_export.json declares them)
    "shapes-heldout": "shapes_heldout.txt",
}
"""Prompt sets shipped with cw-export: name -> file name inside the ``calibration/`` folder."""

_COMMENT_PREFIX = "#"


def _calibration_dirs() -> tuple[Path, ...]:
    """Folders that may hold the builtin sets, in search order (checkout, package data, installed data files)."""
    return data_dirs("calibration")


def _show(path: str | os.PathLike[str]) -> str:
    """The path as text that stays on one line, so error messages remain one line."""
    text = os.fspath(path)
    return repr(text) if any(ch in text for ch in "\r\n") else text


def _os_reason(exc: OSError) -> str:
    """A short lower-case reason for an OS error, for one-line messages."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or str(exc)).lower()


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """Read a prompt file into a list of normalised prompts.

    Lines are stripped; blank lines and ``#`` comment lines are skipped; order is kept; exact duplicates (after
    stripping) are dropped, keeping the first occurrence, so a repeated prompt does not weigh twice in calibration.

    Raises ``PromptFileError`` (one line naming the path) if the file is missing, a directory or other non-regular
    file, unreadable, larger than ``MAX_PROMPT_FILE_BYTES``, not UTF-8 text (invalid UTF-8 or NUL bytes), or holds
    no prompts.
    """
    shown = _show(path)
    limit = MAX_PROMPT_FILE_BYTES

    # 1. stat first: a directory, FIFO or huge file is rejected without opening or reading it.
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PromptFileError(f"{shown}: no such file") from None
    except OSError as exc:
        raise PromptFileError(f"{shown}: unreadable ({_os_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise PromptFileError(f"{shown}: is a directory, not a prompt file")
    if not stat.S_ISREG(info.st_mode):
        raise PromptFileError(f"{shown}: not a regular file")
    if info.st_size > limit:
        raise PromptFileError(f"{shown}: too large: {info.st_size} bytes > {limit} byte limit")

    # 2. read at most limit + 1 bytes, in case the file grew after the stat.
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PromptFileError(f"{shown}: unreadable ({_os_reason(exc)})") from None
    if len(data) > limit:
        raise PromptFileError(f"{shown}: too large: over {limit} bytes > {limit} byte limit (grew while read)")

    # 3. decode: NUL bytes are valid UTF-8 but mean a binary file, so they are rejected too.
    nul = data.find(b"\x00")
    if nul != -1:
        raise PromptFileError(f"{shown}: not UTF-8 text (NUL byte at offset {nul})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{shown}: not UTF-8 text (invalid byte at offset {exc.start})") from None

    # 4. normalise: split on \n, \r\n or \r only, so no other Unicode separator splits a prompt.
    prompts: list[str] = []
    seen: set[str] = set()
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        prompt = line.strip()
        if not prompt or prompt.startswith(_COMMENT_PREFIX) or prompt in seen:
            continue
        seen.add(prompt)
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{shown}: no prompts (file is empty or has only comments and blank lines)")
    return prompts


def load_prompt_set(name_or_path: str | os.PathLike[str]) -> list[str]:
    """Load a builtin prompt set by name (``"default"``, ``"heldout"``) or a prompt file by path.

    A string equal to a builtin name always means the builtin set (write ``./default`` for a local file of that name),
    so recipes can name a set without caring about the working directory.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_PROMPT_SETS:
        file_name = BUILTIN_PROMPT_SETS[name_or_path]
        candidates = [folder / file_name for folder in _calibration_dirs()]
        for candidate in candidates:
            if candidate.is_file():
                return read_prompt_file(candidate)
        searched = ", ".join(str(c) for c in candidates)
        raise PromptFileError(
            f"builtin prompt set {name_or_path!r}: {file_name} not found (searched {searched}); "
            "cw-export was installed without its calibration data"
        )
    if isinstance(name_or_path, str) and not os.path.lexists(name_or_path):
        builtin = ", ".join(sorted(BUILTIN_PROMPT_SETS))
        raise PromptFileError(f"{_show(name_or_path)}: no such file (and not a builtin prompt set: {builtin})")
    return read_prompt_file(name_or_path)


def prompt_set_hash(prompts: list[str]) -> str:
    """SHA-256 hex digest of the prompts, stripped and joined by ``"\\n"``: provenance for manifests.

    Pass the list returned by ``read_prompt_file``/``load_prompt_set``; stripping again is a no-op there and makes the
    hash insensitive to surrounding whitespace. Order matters, as it does for calibration.
    """
    normalised = [prompt.strip() for prompt in prompts]
    for prompt in normalised:
        if "\n" in prompt:
            raise ValueError(f"prompt contains a newline, so the hash would be ambiguous: {prompt!r}")
    return hashlib.sha256("\n".join(normalised).encode("utf-8")).hexdigest()
