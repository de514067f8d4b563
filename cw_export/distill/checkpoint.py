"""Adaptor checkpoints: what ``cw-export distill`` writes and ``cw-export --adaptor learned`` reads.

Files (``OUT`` = the ``--out`` path, which must end in ``.safetensors``):
  OUT                 safetensors of the adaptor's state dict; its metadata carries the ``AdaptorConfig`` and the
                      training settings (model hash, sampler, steps, clock, guidance, prompts hash, epochs, seed ...)
  OUT.resume.pt       resume state: adaptor + Adam state, epochs done, torch RNG state, loss log (``--resume``)
  OUT.log.json        the loss curve, one entry per epoch
Every file is written to a temporary name and ``os.replace``d, so an interrupted run leaves the last complete one.

The adaptor is tied to the model, sampler, step count and clock it was distilled for (PAPER.md "Training"): a build
refuses a checkpoint whose recorded values differ from its own, naming both.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..adaptor import AdaptorConfig
from ..errors import InputError

CHECKPOINT_FORMAT = "cw-export-adaptor/1"
TIED_SETTINGS = ("sampler", "steps", "clock")  # checked before the model is loaded; the model hash after


@dataclass
class AdaptorCheckpoint:
    path: Path
    state_dict: dict
    config: AdaptorConfig
    training: dict  # settings the adaptor was distilled with (see train.training_settings)
    epochs_done: int
    sha256: str

    def provenance(self) -> dict:
        """What a bundle manifest records about the adaptor it was built with."""
        return {"checkpoint_sha256": self.sha256, "epochs_done": self.epochs_done, "config": self.config.to_dict(),
                "training": self.training}


def resume_path(out: Path) -> Path:
    return Path(out).with_suffix(".resume.pt")


def log_path(out: Path) -> Path:
    return Path(out).with_suffix(".log.json")


def _replace_atomically(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, state_dict: dict, config: AdaptorConfig, training: dict, epochs_done: int) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state_dict.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "tool_version": __version__, "epochs_done": str(epochs_done),
                "adaptor_config": json.dumps(config.to_dict(), sort_keys=True),
                "training": json.dumps(training, sort_keys=True)}
    _replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, sort_keys=True, indent=1) + "\n"
    _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_resume_state(path: Path, state: dict) -> None:
    _replace_atomically(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # boundary: corrupt user file
        raise InputError(f"cannot read resume state {path}: {exc}") from None


def read_checkpoint(path: Path) -> AdaptorCheckpoint:
    """Weights, config and training settings of a checkpoint written by ``cw-export distill``."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"adaptor checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except Exception as exc:  # boundary: corrupt user file
        raise InputError(f"cannot read adaptor checkpoint {path}: {exc}") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a cw-export adaptor checkpoint (metadata format "
                         f"{metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); write one with cw-export distill")
    try:
        config = AdaptorConfig(**json.loads(metadata["adaptor_config"]))
        training = json.loads(metadata["training"])
        epochs_done = int(metadata["epochs_done"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"adaptor checkpoint {path} has corrupt metadata: {exc}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return AdaptorCheckpoint(path, state_dict, config, training, epochs_done, digest)


def check_schedule(checkpoint: AdaptorCheckpoint, sampler: str, steps: int, clock: int) -> None:
    """Refuse a checkpoint distilled for another sampler, step count or clock (checked before any heavy work)."""
    wanted = {"sampler": sampler, "steps": steps, "clock": clock}
    for name in TIED_SETTINGS:
        got = checkpoint.training.get(name)
        if got != wanted[name]:
            raise InputError(f"adaptor checkpoint {checkpoint.path} was distilled for {name} {got!r} but the build "
                             f"uses {name} {wanted[name]!r}; the adaptor is tied to sampler, steps and clock "
                             f"(distil again with cw-export distill --{name} {wanted[name]})")


def check_model(checkpoint: AdaptorCheckpoint, model_sha256: str, config: AdaptorConfig) -> None:
    """Refuse a checkpoint distilled for other model weights, or with another adaptor shape."""
    got = checkpoint.training.get("model_sha256")
    if got != model_sha256:
        raise InputError(f"adaptor checkpoint {checkpoint.path} was distilled for model sha256 {str(got)[:12]}... "
                         f"but the build's model has sha256 {model_sha256[:12]}...; distil again for this model")
    if checkpoint.config != config:
        raise InputError(f"adaptor checkpoint {checkpoint.path} has adaptor config {checkpoint.config.to_dict()} "
                         f"but this model needs {config.to_dict()}")
