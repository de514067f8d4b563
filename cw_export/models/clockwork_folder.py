"""What a model folder carries for Clockwork beside its diffusers weights (docs/model_folder.md):

  model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/   the diffusers pipeline
  cw_export.json                   build defaults the model declares (guidance, prompt sets; cw_export.models.declared)
  clockwork/adaptor.safetensors    its distilled Clockwork adaptor (a ``cw-export distill`` checkpoint)

Both are optional. A build uses the folder's adaptor under the same fit rules as any shipped adaptor
(cw_export.distill.for_build.shipped_checkpoint: distilled for these weights, this sampler, steps, clock and
guidance), so the built-in model and a folder written by ``cw-export model`` build identically. Neither file is part
of the model's identity (``folder_hash``): an adaptor distilled on the weights names them by that hash.

Model folders are untrusted input: the adaptor must be a regular file (no symlink) directly in ``clockwork/``,
itself no symlink, at most ``MAX_ADAPTOR_BYTES``; it is read with safetensors only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ModelError

CLOCKWORK_DIR = "clockwork"
ADAPTOR_NAME = "adaptor.safetensors"
ADAPTOR_PATH = f"{CLOCKWORK_DIR}/{ADAPTOR_NAME}"
MAX_ADAPTOR_BYTES = 256 << 20  # SD 1.5's adaptor is ~50 MB at FP32; the built-in's 1 MB
MAX_FOLDER_FILES = 10_000  # a copied model folder (cw-export model / distill --out-model)


def is_clockwork_file(relative: str) -> bool:
    """Whether a folder-relative POSIX path is Clockwork data rather than part of the model (left out of its hash)."""
    return relative == CLOCKWORK_DIR or relative.startswith(CLOCKWORK_DIR + "/")


def folder_adaptor(folder: Path) -> Path | None:
    """``folder/clockwork/adaptor.safetensors`` when the folder ships one, else None; a present but unsafe one
    (symlinked, not a regular file, too large, anything else in ``clockwork/`` under that name) is a ModelError."""
    folder = Path(folder)
    clockwork = folder / CLOCKWORK_DIR
    if not clockwork.exists() and not clockwork.is_symlink():
        return None
    if clockwork.is_symlink() or not clockwork.is_dir():
        raise ModelError(f"{clockwork} must be a folder inside the model folder (not a symlink or a file)")
    path = clockwork / ADAPTOR_NAME
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ModelError(f"{path} must be a regular file (a symlinked or special adaptor is refused)")
    if path.resolve().parent != clockwork.resolve() or not clockwork.resolve().is_relative_to(folder.resolve()):
        raise ModelError(f"{path} lies outside the model folder {folder}")
    size = path.stat().st_size
    if size > MAX_ADAPTOR_BYTES:
        raise ModelError(f"{path} is {size} bytes, larger than the {MAX_ADAPTOR_BYTES} an adaptor may be")
    return path


def copy_model_folder(source: Path, out: Path) -> None:
    """Byte-copy a model folder (weights, configs, tokenizer, cw_export.json, clockwork/) into the empty folder
    ``out``: regular files and folders only, so the copy hashes as the source (``folder_hash``) and its adaptor still
    fits it. A symlink or special file in the source is refused."""
    source, out = Path(source), Path(out)
    files = sorted(source.rglob("*"))
    if len(files) > MAX_FOLDER_FILES:
        raise ModelError(f"model folder {source} holds more than {MAX_FOLDER_FILES} entries")
    for entry in files:
        relative = entry.relative_to(source)
        if entry.is_symlink():
            raise ModelError(f"model folder {source} holds a symlink ({relative}); copy refused")
        target = out / relative
        if entry.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif entry.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry, target)
        else:
            raise ModelError(f"model folder {source} holds a special file ({relative}); copy refused")
