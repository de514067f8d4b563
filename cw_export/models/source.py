"""The model a bundle was built from, as its manifest records it (``source_model``): the spec ``load_model`` takes
again, so validate, evaluate and the grid can compare the bundle with its own FP32 source."""

from __future__ import annotations

from pathlib import Path


def source_model_spec(manifest: dict) -> str | None:
    """The built-in model's name or the model folder's path; None when the manifest names neither."""
    source = manifest.get("source_model") or {}
    spec = source.get("name") if source.get("kind") == "builtin" else source.get("path")
    return spec if isinstance(spec, str) and spec else None


def source_model_reachable(manifest: dict) -> bool:
    """Whether ``source_model_spec`` can be loaded here (a model folder must still exist)."""
    spec = source_model_spec(manifest)
    source = manifest.get("source_model") or {}
    return spec is not None and (source.get("kind") != "folder" or Path(spec).is_dir())


def load_source_model(manifest: dict):
    """The source model as the bundle was exported from it: loaded by ``source_model_spec``, with the LoRAs the
    manifest records fused in again (docs/lora.md); a recorded LoRA that is gone or changed is an InputError."""
    from ..errors import InputError
    from .lora import fuse_loras, recorded_loras
    from .pipeline import load_model

    model = load_model(source_model_spec(manifest))
    loras = recorded_loras(manifest)
    if isinstance(loras, str):
        raise InputError(f"cannot rebuild the bundle's FP32 source: {loras}")
    return fuse_loras(model, loras)
