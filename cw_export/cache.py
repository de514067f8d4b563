"""The build cache (calibration data, distillation teacher data, adaptors): content-keyed folders filled atomically.

An entry is a folder named by a hash of the settings that produced it, complete once its ``meta.json`` exists;
it is filled in a temporary folder and renamed into place, so a killed build never leaves a half entry behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

CACHE_ENV = "CW_EXPORT_CACHE"
META_NAME = "meta.json"


def cache_root() -> Path:
    """``$CW_EXPORT_CACHE`` or ``~/.cache/cw-export``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cw-export"


def cached_entry(root: Path, key: str, fill: Callable[[Path], dict]) -> tuple[Path, bool]:
    """The folder of entry ``key`` under ``root`` and whether it was reused; ``fill(tmp)`` writes a new one and
    returns its metadata (stored as meta.json)."""
    folder = root / key
    if (folder / META_NAME).is_file():
        return folder, True
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = fill(tmp)
        (tmp / META_NAME).write_text(json.dumps(meta, sort_keys=True, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process filled the same entry meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, False
