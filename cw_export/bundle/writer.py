"""The bundle writer: the manifest assembled from the stages' records, and the files written last (report.html,
README.md, the file table, manifest.json in its canonical bytes).

``BuildRecords`` holds what the stages returned (the export's fixed fields and graph entries, the adaptor's
provenance, the calibration, quantization, parity and context-binary records); ``manifest()`` is the one place
that turns them into the manifest's JSON object, and stages read that view, never write into it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..contract.graphs import BATCH, make_wiring
from ..contract.manifest import MANIFEST_NAME, SCHEMA_VERSION, list_files, manifest_bytes
from ..contract.schedule import step_kinds
from ..contract.schema import GraphEntry, LoraRecord, ParityRecord
from ..export.to_onnx import ExportResult
from ..models.pipeline import SDModel
from ..recipe import Recipe
from ..runtime import schedulers
from ..runtime.sessions import session_config
from ..split import add_time_features_spec, has_text_time, sdxl_time_ids, time_features_spec
from .handoff import write_handoff
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


@dataclass
class BuildRecords:
    """The stages' records of one build, in data-flow order; ``manifest()`` assembles them."""

    fixed: dict  # the fields the export stage fixes: versions, recipe, source model, wiring, schedule, sampler, ...
    graphs: dict[str, GraphEntry]  # the export's FP32 entries, replaced by the quantize stage and the gate
    adaptor: dict  # kind, and a learned adaptor's provenance (cw_export.distill.for_build)
    calibration: dict | None = None
    parity: ParityRecord | None = None
    context_binaries: dict | None = None  # QNN EPContext models per SoC and graph
    loras: tuple[LoraRecord, ...] = ()  # LoRAs fused into the model at load (cw_export.models.lora)

    def manifest(self) -> dict:
        """The manifest's JSON object (without ``files``, which the writer adds last)."""
        data = {**self.fixed, "graphs": {name: entry.to_dict() for name, entry in self.graphs.items()},
                "adaptor": dict(self.adaptor)}
        if self.calibration is not None:
            data["calibration"] = self.calibration
        if self.parity is not None:
            data["parity"] = self.parity.to_dict()
        if self.context_binaries is not None:
            data["context_binaries"] = self.context_binaries
        if self.loras:
            data["loras"] = [record.to_dict() for record in self.loras]
        return data


def base_records(model: SDModel, recipe: Recipe, results: dict[str, ExportResult], num_skips: int,
                 latent: tuple[int, int], table: dict, bundle: Path) -> BuildRecords:
    """The export stage's records: every field fixed before quantization, and the FP32 graph entries."""
    b = recipe.build
    sampler_config = dict(model.scheduler_config)
    fixed = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "cw-export", "version": __version__},
        "versions": library_versions(),
        "target": recipe.name,
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.source_sha256,
        "source_model": model.source,
        "wiring": prune_wiring(make_wiring(num_skips, b.adaptor, dual_text=model.dual_text,
                                           text_time=has_text_time(model.unet),
                                           empty_negative_zeros=model.force_zeros_for_empty_prompt), results),
        "time_features": time_features_spec(model.unet),
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
        **({"tokenizer_2": {"folder": "tokenizer_2", "model_max_length": int(model.tokenizer_2.model_max_length)}}
           if model.dual_text else {}),
        # onnxruntime settings parity is measured under; the runtime creates its sessions with exactly these
        "session_options": session_config(recipe.quantization.ort_optimization,
                                          recipe.quantization.ort_disabled_optimizers),
    }
    added = add_time_features_spec(model.unet, sdxl_time_ids(latent[0] * model.vae_scale_factor,
                                                              latent[1] * model.vae_scale_factor))
    if added is not None:  # SDXL: high_res_in's add_time_features, computed on the host like time_features
        fixed["add_time_features"] = added
    graphs = {name: result.entry(bundle) for name, result in results.items()}
    return BuildRecords(fixed, graphs, {"kind": b.adaptor})


def with_file_opsets(folder: Path, records: BuildRecords) -> BuildRecords:
    """``records`` with each graph's opset read from the file as written (the recipe's export opset is what the FP32
    exporter was asked for; the quantizers raise graphs to 21 for 16-bit Q/DQ), which validate's lint checks."""
    import onnx

    from ..onnx_index import default_opset

    for name, entry in records.graphs.items():
        opset = default_opset(onnx.load(str(folder / entry.file), load_external_data=False))
        records.graphs[name] = replace(entry, opset=opset)
    return records


def write_bundle(folder: Path, records: BuildRecords) -> None:
    """The bundle's last files: report.html and README.md (both listed in the file table, so written first), then
    the file table and manifest.json in its canonical bytes."""
    manifest = with_file_opsets(folder, records).manifest()
    write_report(folder, manifest)
    write_handoff(folder, manifest)
    manifest["files"] = list_files(folder)
    (folder / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
