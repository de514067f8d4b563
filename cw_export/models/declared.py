"""Settings a model folder declares for itself in ``cw_export.json`` beside its weights (read without loading them).

A model knows what it is for: the built-in shapes model declares its guidance scale and its own calibration and
held-out prompt sets (its train and held-out captions), because ranges calibrated on prompts far outside what a model
draws, and a parity gate measured there, describe the wrong activations. Every value is optional; the recipe's
applies where the model declares none, and a command-line flag beats both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModelError
from ..prompts import BUILTIN_PROMPT_SETS
from .pipeline import BUILTIN_MODELS, BUILTIN_NAME, MODEL_DEFAULTS_NAME, SHAPES_DIR, SHAPES_NAME

PROMPT_SET_KEYS = ("calibration_set", "heldout_set")  # recipe [quantization] calibration_set, [parity] heldout_set
NOTE_KEYS = ("why", "prompt_sets_why")  # free text: why the values were chosen (kept with them, never read)
DECLARED_KEYS = ("guidance_scale", *PROMPT_SET_KEYS, *NOTE_KEYS)
MAX_NOTE_CHARS = 4000
MAX_DEFAULTS_BYTES = 1 << 16


def model_folder(spec: str) -> Path | None:
    """The folder a model spec loads from (None for the models generated in code)."""
    if spec in (BUILTIN_NAME, SHAPES_NAME):
        return SHAPES_DIR
    if spec in BUILTIN_MODELS:
        return None
    return Path(spec)


def model_defaults(spec: str) -> dict:
    """The model folder's cw_export.json as a dict ({} when there is none)."""
    folder = model_folder(spec)
    path = None if folder is None else folder / MODEL_DEFAULTS_NAME
    if path is None or (not path.exists() and not path.is_symlink()):
        return {}
    if path.is_symlink() or not path.is_file():
        raise ModelError(f"{path} must be a regular file (a symlinked or special one is refused)")
    try:
        if path.stat().st_size > MAX_DEFAULTS_BYTES:
            raise ModelError(f"{path}: larger than {MAX_DEFAULTS_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"unreadable {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must be a JSON object")
    unknown = sorted(set(data) - set(DECLARED_KEYS))
    if unknown:
        raise ModelError(f"{path}: unknown key {unknown[0]!r:.60}; a model folder declares only "
                         f"{', '.join(DECLARED_KEYS)} (docs/model_folder.md)")
    for key in NOTE_KEYS:
        if key in data and (not isinstance(data[key], str) or len(data[key]) > MAX_NOTE_CHARS):
            raise ModelError(f"{path}: {key} must be a string of at most {MAX_NOTE_CHARS} characters")
    return data


def check_declared(spec: str) -> None:
    """Every field of the model folder's cw_export.json, checked before any heavy work (a bad one is a ModelError
    whether or not a flag overrides it)."""
    declared_guidance(spec)
    declared_prompt_sets(spec)


def declared_guidance(spec: str) -> float | None:
    """The classifier-free guidance scale the model declares, or None. Measured on the shapes model: prompt
    accuracy 100% at guidance 4, 86% at the recipes' 7.5 (docs/builtin_model.md)."""
    value = model_defaults(spec).get("guidance_scale")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ModelError(f"{model_folder(spec) / MODEL_DEFAULTS_NAME}: guidance_scale must be a finite number >= 0, "
                         f"got {value!r}")
    return float(value)


def declared_prompt_sets(spec: str) -> dict[str, str]:
    """``calibration_set`` / ``heldout_set`` the model declares: a built-in prompt set's name, or a prompt file
    inside the model folder (a plain relative name, no symlink), returned as its path."""
    declared = {}
    defaults = model_defaults(spec)
    for key in PROMPT_SET_KEYS:
        value = defaults.get(key)
        if value is None:
            continue
        where = f"{model_folder(spec) / MODEL_DEFAULTS_NAME}: {key}"
        if not isinstance(value, str) or not value:
            raise ModelError(f"{where} must be a prompt set name or a file name, got {value!r:.60}")
        if value in BUILTIN_PROMPT_SETS:
            declared[key] = value
            continue
        folder = model_folder(spec).resolve()
        path = folder / value
        if Path(value).is_absolute() or ".." in Path(value).parts or path.is_symlink() or not path.is_file() \
                or path.resolve().parent != folder:
            raise ModelError(f"{where} {value!r:.60} is neither a built-in prompt set "
                             f"({', '.join(sorted(BUILTIN_PROMPT_SETS))}) nor a file in the model folder")
        declared[key] = str(path)
    return declared
