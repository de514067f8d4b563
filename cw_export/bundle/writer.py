"""The bundle writer: the manifest assembled from the stages' records, and the files written last (report.html,
README.md, the file table, manifest.json in its canonical bytes)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from .. import __version__
from ..contract.graphs import BATCH, make_wiring
from ..contract.manifest import MANIFEST_NAME, SCHEMA_VERSION, list_files, manifest_bytes
from ..contract.schedule import step_kinds
from ..export.to_onnx import ExportResult
from ..models.pipeline import SDModel
from ..recipe import Recipe
from ..runtime import schedulers
from ..runtime.sessions import session_config
from ..split import time_features_spec
from .handoff import write_handoff
from .opsets import record_graph_opsets
from .report import write_report


def prune_wiring(wiring: dict, results: dict[str, ExportResult]) -> dict:
    """Drop wiring inputs a graph does not take (the exporter removes unused inputs)."""
    for name, spec in wiring["graphs"].items():
        if name in results:
            taken = {t.name for t in results[name].inputs}
            spec["inputs"] = {k: v for k, v in spec["inputs"].items() if k in taken}
    return wiring


def library_versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def base_manifest(model: SDModel, recipe: Recipe, results: dict[str, ExportResult], num_skips: int,
                   latent: tuple[int, int], table: dict, bundle: Path) -> dict:
    b = recipe.build
    sampler_config = dict(model.scheduler_config)
    graphs = {}
    for name, result in results.items():
        graphs[name] = {"file": result.file.relative_to(bundle).as_posix(), **result.io_dict(),
                        "precision": "fp32", "simplified": result.simplified,
                        "external_data": result.external_data, "parity_fp32_vs_torch": result.parity}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "cw-export", "version": __version__},
        "versions": library_versions(),
        "target": recipe.name,
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.source_sha256,
        "source_model": model.source,
        "graphs": graphs,
        "wiring": prune_wiring(make_wiring(num_skips, b.adaptor), results),
        "time_features": time_features_spec(model.unet),
        "adaptor": {"kind": b.adaptor},
        "schedule": {"steps": b.steps, "clock": b.clock, "step_kinds": step_kinds(b.steps, b.clock),
                     "rule": "step 1 (index 0) is full; step index i is full when i % clock == 0, else clocked"},
        "sampler": {"name": b.sampler, "config": sampler_config,
                    "alphas_cumprod": [float(a) for a in schedulers.alphas_cumprod_from_config(sampler_config)],
                    "step_table": table},
        "guidance_scale": b.guidance_scale,
        "batch": BATCH,
        "latent": {"shape": [1, model.unet.config.in_channels, *latent],
                   "scaling_factor": float(model.vae.config.scaling_factor),
                   "vae_scale_factor": model.vae_scale_factor,
                   "image_size": [latent[0] * model.vae_scale_factor, latent[1] * model.vae_scale_factor]},
        "tokenizer": {"folder": "tokenizer", "model_max_length": int(model.tokenizer.model_max_length)},
        # onnxruntime settings parity is measured under; the runtime creates its sessions with exactly these
        "session_options": session_config(recipe.quantization.ort_optimization,
                                          recipe.quantization.ort_disabled_optimizers),
    }


def write_bundle(folder: Path, manifest: dict) -> None:
    """The bundle's last files: report.html and README.md (both listed in the file table, so written first), then
    the file table and manifest.json in its canonical bytes."""
    record_graph_opsets(folder, manifest)  # each graph's opset as written, not the recipe's export opset
    write_report(folder, manifest)
    write_handoff(folder, manifest)
    manifest["files"] = list_files(folder)
    (folder / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
