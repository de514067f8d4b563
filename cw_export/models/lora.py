"""LoRA weights fused into the model at build time (``cw-export --lora FILE [--lora-scale F]``, docs/lora.md).

Each LoRA (diffusers or kohya format, safetensors only) is loaded into the UNet and text encoder with diffusers'
``load_lora_weights`` and fused into their weights with ``fuse_lora`` at its scale, in the order given; the adapter
layers are then unloaded, so every later stage (export, calibration, parity) sees plain fused weights. The model's
identity (``source["sha256"]``, which keys every cache and decides which adaptor fits) becomes a hash of the base
weights' and each LoRA's sha256 and scale, so a fused model never reuses what an unfused one cached. A LoRA at scale 0
adds ``0 * up @ down`` = 0 to every weight, leaving it bit for bit unchanged: it leaves the identity unchanged too.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..contract.schema import LoraRecord
from ..errors import InputError, ModelError
from .pipeline import PICKLE_SUFFIXES, SDModel, diffusers_pipeline

MAX_LORA_BYTES = 4 << 30  # SDXL LoRAs reach ~1.7 GB; nothing that size is a LoRA of an SD 1.x/2.x UNet
MAX_LORAS = 16
MAX_ABS_SCALE = 100.0
LORA_COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE`` with its ``--lora-scale`` (default 1)."""

    path: Path
    scale: float = 1.0


def check_loras(specs: tuple[LoraSpec, ...]) -> tuple[LoraRecord, ...]:
    """Every LoRA file checked (regular safetensors file, no symlink, size, a readable header) and hashed before
    any heavy work; its records, in order."""
    if len(specs) > MAX_LORAS:
        raise InputError(f"at most {MAX_LORAS} --lora files, got {len(specs)}")
    return tuple(_check_one(spec) for spec in specs)


def _check_one(spec: LoraSpec) -> LoraRecord:
    path = Path(spec.path)
    if not math.isfinite(spec.scale) or abs(spec.scale) > MAX_ABS_SCALE:
        raise InputError(f"--lora-scale for {path} must be a finite number in [-{MAX_ABS_SCALE:g}, "
                         f"{MAX_ABS_SCALE:g}], got {spec.scale}")
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"--lora {path} is a pickle file; cw-export reads LoRAs from .safetensors only "
                         "(unpickling can run code)")
    if path.suffix != ".safetensors":
        raise InputError(f"--lora {path} must be a .safetensors file")
    if path.is_symlink():
        raise InputError(f"--lora {path} is a symlink; pass the file itself")
    if not path.is_file():
        raise InputError(f"--lora {path}: no such file" if not path.exists() else f"--lora {path} is not a file")
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise InputError(f"--lora {path} is {size} bytes, more than the {MAX_LORA_BYTES} a LoRA may be")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
    except Exception as exc:  # boundary: any corrupt user file becomes one line
        raise InputError(f"--lora {path} is not a readable safetensors file: {_first_line(exc)}") from None
    if not names:
        raise InputError(f"--lora {path} holds no tensors")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return LoraRecord(str(path.absolute()), digest.hexdigest(), float(spec.scale))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fused_identity(base_sha256: str, records: tuple[LoraRecord, ...]) -> str:
    """The fused model's identity: the base weights' hash when no LoRA changes a weight (all scales 0), else a hash
    of it and each LoRA's sha256 and scale, in order."""
    effective = [r for r in records if r.scale != 0]
    if not effective:
        return base_sha256
    digest = hashlib.sha256(f"cw-export-lora/1:{base_sha256}".encode())
    for record in effective:
        digest.update(f":{record.sha256}:{record.scale!r}".encode())
    return digest.hexdigest()


def fuse_loras(model: SDModel, records: tuple[LoraRecord, ...]) -> SDModel:
    """Fuse each LoRA into ``model``'s UNet and text encoder in place, at its scale (``records`` from
    ``check_loras``); a file whose sha256 changed since, or that matches no layer, is an error."""
    if not records:
        return model

    pipe = diffusers_pipeline(model)  # StableDiffusionXLPipeline's loader for SDXL (its two text encoders)
    components_of_model = LORA_COMPONENTS + (("text_encoder_2",) if model.dual_text else ())
    before = {name: set(getattr(model, name).state_dict()) for name in components_of_model}
    for i, record in enumerate(records):
        path = Path(record.file)
        if _check_one(LoraSpec(path, record.scale)).sha256 != record.sha256:
            raise InputError(f"--lora {path} changed while the build ran")
        name = f"cw_lora_{i}"
        try:
            with _quiet_diffusers():  # it logs its own error line before raising; ours is the one line
                pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # boundary: a LoRA for another architecture, or a broken one, becomes one line
            raise ModelError(f"cannot load LoRA {path} into the model: {_first_line(exc)}") from None
        loaded = pipe.get_list_adapters()
        if not any(name in adapters for adapters in loaded.values()):
            raise ModelError(f"LoRA {path} matches no layer of the model's UNet or text encoder "
                             "(a LoRA of another architecture?)")
        components = [c for c in components_of_model if name in loaded.get(c, [])]
        pipe.fuse_lora(components=components, lora_scale=record.scale, adapter_names=[name])
    pipe.unload_lora_weights()
    for component in components_of_model:
        module = getattr(model, component)
        module.eval().requires_grad_(False)
        if set(module.state_dict()) != before[component]:
            raise ModelError(f"fusing the LoRAs left adapter layers in the {component} (diffusers/peft versions?)")
    base = model.source["sha256"]
    identity = fused_identity(base, records)
    if identity != base:  # the manifest's source names both: the weights loaded and the weights exported
        model.source = {**model.source, "sha256": identity, "base_sha256": base}
    return model


@contextmanager
def _quiet_diffusers():
    """diffusers' logging above critical for the duration (restored on exit)."""
    from diffusers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(before)


def recorded_loras(manifest: dict) -> tuple[LoraRecord, ...] | str:
    """The LoRAs a bundle's manifest says were fused into it, when every file is still there with its sha256
    (``validate`` fuses them into the source model again before re-measuring parity); else why not, as a string."""
    records = []
    for entry in manifest.get("loras") or []:
        record = LoraRecord(str(entry["file"]), str(entry["sha256"]), float(entry["scale"]))
        try:
            found = _check_one(LoraSpec(Path(record.file), record.scale)).sha256
        except InputError:
            found = None
        if found != record.sha256:
            return f"LoRA {record.file} not reachable or changed since the bundle was built"
        records.append(record)
    return tuple(records)
