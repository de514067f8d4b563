"""Build a bundle: load -> split -> export graphs -> manifest, written atomically (the main job).

Steps:
  1. load the model and apply the recipe (shapes, schedule, sampler)
  2. split the UNet at the Stage-1 cut and build the adaptor
  3. make example inputs from a real prompt and the first denoising step
  4. export every graph to ONNX and measure torch-vs-onnxruntime parity
  5. quantized targets only (cw_export.quantize.stages): calibrate on FP32 trajectories -> quantize each UNet-side
     graph (a8 sensitivity sweep where the recipe asks) -> parity in onnxruntime on held-out prompts, gated;
     with --soc, QNN context binaries of the quantized graphs (cw_export.context_binaries)
  6. write tokenizer files, report.html, README.md (hand-off) and manifest.json; list every file with sha256 and size
The whole bundle is built in a temporary folder and renamed into place only when every step succeeded.
"""

from __future__ import annotations

import math
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .adaptor import ADAPTOR_KINDS, build_adaptor, default_adaptor_config
from .atomic import atomic_directory, check_output_path, clean_stale_temps, pause_point
from .errors import InputError, ParityError
from .export import ExportResult, export_graph
from .graphs import TextEncoderGraph, VaeDecoderGraph
from .handoff import write_handoff
from .models.pipeline import SDModel, check_model_spec, load_model, shipped_adaptor, write_tokenizer_files
from .progress import progress_bar
from .recipe import Recipe
from .report import write_report
from .resources_check import check_build_memory
from .runtime import schedulers
from .runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, list_files, manifest_bytes
from .runtime.schedule import check_steps_and_clock, step_kinds
from .runtime.sessions import session_config
from .split import split_unet, time_features_spec

BATCH = 2  # classifier-free guidance: [uncond, cond]
EXAMPLE_PROMPT = "a red triangle on the left of a blue square"


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs beside the recipe; None values fall back to the recipe."""

    model: str = "builtin"
    out: Path = Path("bundle")
    overwrite: bool = False
    adaptor_checkpoint: Path | None = None
    progress: bool = True
    allow_low_parity: bool = False  # write a quantized bundle even if it misses the recipe's parity thresholds
    socs: tuple[str, ...] = ()  # --soc: compile QNN context binaries for these SoCs (cw_export.context_binaries)
    # no --adaptor given: a model that ships a distilled adaptor fitting this schedule and these weights (the built-in
    # shapes model) builds with it; otherwise the recipe's adaptor. Measured on shapes, clock 2: prompt accuracy 76.7%
    # with its learned adaptor, 30.8% with the identity one (docs/builtin_model.md)
    model_adaptor: bool = False


def check_build_settings(recipe: Recipe) -> None:
    """Reject impossible recipe/CLI combinations before any heavy work."""
    b = recipe.build
    check_steps_and_clock(b.steps, b.clock)
    if not math.isfinite(b.guidance_scale) or b.guidance_scale < 0:
        raise InputError(f"--guidance must be a finite number >= 0, got {b.guidance_scale}")
    if b.adaptor not in ADAPTOR_KINDS:
        raise InputError(f"--adaptor must be one of {', '.join(ADAPTOR_KINDS)}, got '{b.adaptor}'")
    if b.sampler not in schedulers.SAMPLERS:
        raise InputError(f"sampler '{b.sampler}' unknown; available: {', '.join(schedulers.SAMPLERS)}")
    for name in ("height", "width"):
        if getattr(b, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(b, name)}")


def latent_hw(model: SDModel, recipe: Recipe) -> tuple[int, int]:
    """Latent height/width from the recipe's pixel size; must divide by the VAE and UNet factors."""
    factor = model.vae_scale_factor
    unet_factor = 2 ** (len(model.unet.down_blocks) - 1)
    native = model.default_latent_size * factor
    height = recipe.build.height or native
    width = recipe.build.width or native
    for name, value in (("height", height), ("width", width)):
        if value % (factor * unet_factor):
            raise InputError(f"--{name} {value} must be divisible by {factor * unet_factor} "
                             f"(VAE factor {factor} x UNet factor {unet_factor})")
    return height // factor, width // factor


def make_wiring(num_skips: int, adaptor: str) -> dict:
    """Which slot each graph input reads and each output writes, per step kind (the manifest's contract)."""
    skips = {f"skip_{i}": f"skip_{i}" for i in range(num_skips)}
    graphs = {
        "high_res_in": {"inputs": {"sample": "sample", "time_features": "time_features",
                                   "encoder_hidden_states": "encoder_hidden_states"},
                        "outputs": {"temb": "temb", "r_in": "r_in", **skips}},
        "low_res": {"inputs": {"r_in": "r_in", "temb": "temb", "encoder_hidden_states": "encoder_hidden_states"},
                    "outputs": {"r_out": "r_out"}},
        "high_res_out": {"inputs": {"r_out": "r_out", "temb": "temb",
                                    "encoder_hidden_states": "encoder_hidden_states", **skips},
                         "outputs": {"noise_pred": "noise_pred"}},
    }
    clocked = ["high_res_in", "high_res_out"]
    aliases = {"r_out": "r_out_prev"}
    if adaptor == "learned":
        graphs["adaptor"] = {"inputs": {"r_in": "r_in", "r_out_prev": "r_out_prev", "temb": "temb",
                                        "pooled_text": "pooled_text"},
                             "outputs": {"r_out": "r_out"}}
        clocked = ["high_res_in", "adaptor", "high_res_out"]
        aliases = {}
    return {
        "step_inputs": ["sample", "time_features", "encoder_hidden_states", "pooled_text"],
        "graphs": graphs,
        "steps": {"full": ["high_res_in", "low_res", "high_res_out"], "clocked": clocked},
        "clocked_aliases": aliases,
        "cache": {"r_out_prev": "r_out"},
        "step_output": "noise_pred",
        "guidance": "noise = noise_pred[0] + guidance_scale * (noise_pred[1] - noise_pred[0]); batch = [uncond, cond]",
        "text": {"graph": "text_encoder", "input": "input_ids", "batch": ["negative_prompt", "prompt"]},
        "decode": {"graph": "vae_decoder", "input": "latents", "output": "image",
                   "note": "latents are the sampler's final x (before 1/scaling_factor, which is inside the graph); "
                           "image is RGB in [0, 1]"},
    }


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


def example_inputs(model: SDModel, split, latent_h: int, latent_w: int, table: dict) -> dict:
    """Realistic inputs for export and parity: a real prompt's embeddings and the first step's noisy latents."""
    generator = torch.Generator().manual_seed(0)
    ids = model.tokenize(["", EXAMPLE_PROMPT])
    with torch.no_grad():
        text = model.text_encoder(input_ids=ids, return_dict=True)
    channels = model.unet.config.in_channels
    latents = torch.randn((1, channels, latent_h, latent_w), generator=generator) * table["init_noise_sigma"]
    sample = torch.cat([latents, latents]) * float(table["input_scale"][0])
    timestep = torch.full((BATCH,), float(table["timesteps"][0]))
    return {"input_ids": ids, "encoder_hidden_states": text.last_hidden_state, "pooled_text": text.pooler_output,
            "sample": sample, "time_features": split.time_features(timestep)}


def export_all(model: SDModel, recipe: Recipe, graphs_dir: Path, latent_hw_: tuple[int, int], table: dict,
               adaptor_state: dict | None, progress: bool) -> tuple[dict[str, ExportResult], int]:
    """Export text_encoder, high_res_in, low_res, high_res_out (and the learned adaptor)."""
    split = split_unet(model.unet)
    ex = example_inputs(model, split, *latent_hw_, table)
    ehs = ex["encoder_hidden_states"]
    parts = split.graph_modules()
    with torch.no_grad():
        temb, r_in, *skips = parts["high_res_in"](ex["sample"], ex["time_features"], ehs)
        r_out = split.low_res(r_in, temb, ehs)
    skip_inputs = dict(zip(split.skip_names, skips))
    jobs = {
        "text_encoder": (TextEncoderGraph(model.text_encoder), {"input_ids": ex["input_ids"]},
                         ["encoder_hidden_states", "pooled_text"]),
        "high_res_in": (parts["high_res_in"], {"sample": ex["sample"], "time_features": ex["time_features"],
                                               "encoder_hidden_states": ehs}, ["temb", "r_in", *split.skip_names]),
        "low_res": (parts["low_res"], {"r_in": r_in, "temb": temb, "encoder_hidden_states": ehs}, ["r_out"]),
        "high_res_out": (parts["high_res_out"], {"r_out": r_out, "temb": temb, "encoder_hidden_states": ehs,
                                                 **skip_inputs}, ["noise_pred"]),
        "vae_decoder": (VaeDecoderGraph(model.vae), {"latents": ex["sample"][:1] / table["init_noise_sigma"]},
                        ["image"]),
    }
    if recipe.build.adaptor == "learned":
        config = default_adaptor_config(model.unet, model.text_encoder.config.hidden_size)
        adaptor = build_adaptor(config, adaptor_state)
        jobs["adaptor"] = (adaptor, {"r_in": r_in, "r_out_prev": r_out, "temb": temb,
                                     "pooled_text": ex["pooled_text"]}, ["r_out"])
    results = {}
    bar = progress_bar(jobs.items(), enabled=progress, desc="export", unit="graph")
    for name, (module, inputs, outputs) in bar:
        bar.set_postfix_str(name)
        results[name] = export_graph(module, inputs, outputs, graphs_dir / f"{name}.onnx",
                                     opset=recipe.export.opset, simplify=recipe.export.simplify)
        pause_point("export")
    return results, split.num_skips


def check_fp32_parity(results: dict[str, ExportResult], recipe: Recipe) -> None:
    limit = recipe.parity.graph_max_rel_diff
    failing = {n: r.parity["max_rel_diff"] for n, r in results.items() if r.parity["max_rel_diff"] > limit}
    if failing:
        worst = max(failing, key=failing.get)
        raise ParityError(f"graph {worst}: onnxruntime differs from torch by {failing[worst]:.2e} "
                          f"(relative) > {limit:.0e}; {len(failing)} graph(s) failing")


def build_manifest(model: SDModel, recipe: Recipe, results: dict[str, ExportResult], num_skips: int,
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


def build_bundle(recipe: Recipe, options: BuildOptions) -> Path:
    """The main job. Returns the bundle path; on any failure nothing is left at ``options.out``."""
    check_build_settings(recipe)
    out = Path(options.out).absolute()
    clean_stale_temps(out.parent)  # leftovers of killed builds go first, even if this build fails early
    check_output_path(out, options.overwrite)
    if options.adaptor_checkpoint is not None:
        check_adaptor_checkpoint(recipe, options.adaptor_checkpoint)  # before any heavy work
    check_model_spec(options.model)
    if recipe.quantized:
        from .quantize import check_settings
        from .quantize.stages import check_prompt_sources

        check_settings(recipe.quantization)
        check_prompt_sources(recipe)
    if options.socs:
        from .context_binaries import check_context_settings

        check_context_settings(tuple(options.socs), recipe.quantized)
    total = 4 + 3 * recipe.quantized + bool(options.socs)
    with progress_bar(total=total, enabled=options.progress, desc="build", unit="stage") as stages:
        return _build(recipe, options, out, stages)


def _build(recipe: Recipe, options: BuildOptions, out: Path, stages) -> Path:
    stages.set_postfix_str("load model")
    pause_point("load")
    model = load_model(options.model)
    latent = latent_hw(model, recipe)
    check_build_memory(model, latent)
    table = schedulers.build_step_table(recipe.build.sampler, model.scheduler_config, recipe.build.steps)
    wants_shipped = options.adaptor_checkpoint is None and (options.model_adaptor or recipe.build.adaptor == "learned")
    shipped = shipped_checkpoint(model, recipe) if wants_shipped else None
    if options.model_adaptor and shipped is not None:
        recipe = recipe.with_build(adaptor="learned")
    adaptor_checkpoint = None
    if recipe.build.adaptor == "learned":
        stages.set_postfix_str("learned adaptor")
        adaptor_checkpoint = load_learned_adaptor(model, recipe, options, latent, shipped)
    adaptor_state = None if adaptor_checkpoint is None else adaptor_checkpoint.state_dict
    stages.update()
    with atomic_directory(out, overwrite=options.overwrite) as tmp:
        stages.set_postfix_str("export graphs")
        results, num_skips = export_all(model, recipe, tmp / "graphs", latent, table, adaptor_state,
                                        options.progress)
        check_fp32_parity(results, recipe)
        stages.update()
        stages.set_postfix_str("tokenizer")
        write_tokenizer_files(model, tmp / "tokenizer")
        stages.update()
        stages.set_postfix_str("manifest")
        manifest = build_manifest(model, recipe, results, num_skips, latent, table, tmp)
        if adaptor_checkpoint is not None:
            manifest["adaptor"].update(adaptor_checkpoint.provenance())
        if recipe.quantized:
            quantize_bundle(model, recipe, manifest, tmp, adaptor_state, options, stages)
        if options.socs:
            from .context_binaries import context_stage

            stages.set_postfix_str("context binaries")
            context_stage(tmp, manifest, tuple(options.socs), options.progress)
            stages.update()
        write_report(tmp, manifest)  # report.html is a bundle file: written before the file list (cw_export.report)
        write_handoff(tmp, manifest)  # README.md for app teams, also listed with its sha256 (cw_export.handoff)
        manifest["files"] = list_files(tmp)
        (tmp / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
        pause_point("manifest")
        stages.update()
    return out


def quantize_bundle(model: SDModel, recipe: Recipe, manifest: dict, bundle: Path, adaptor_state: dict | None,
                    options: BuildOptions, stages) -> None:
    """Calibrate -> quantize -> parity gate (one function per stage, in cw_export.quantize.stages)."""
    from .quantize import stages as q

    stages.set_postfix_str("calibrate")
    graphs = q.torch_graphs(model, manifest, adaptor_state)
    adaptor_sha = None if adaptor_state is None else _state_hash(adaptor_state)
    calibration = q.calibrate_stage(model, recipe, manifest, graphs, adaptor_sha, options.progress)
    stages.update()
    stages.set_postfix_str("quantize")
    with tempfile.TemporaryDirectory(prefix="cw-a16-fallback-") as held:  # like the quantizers' scratch folders
        fallback_dir = Path(held)
        fp32_held = q.hold_fp32(recipe, manifest, bundle, fallback_dir)
        placed, fallbacks = q.quantize_stage(recipe, manifest, graphs, calibration, bundle, options.progress,
                                             fallback_dir)
        del calibration  # the parity stage measures on held-out prompts; these samples need not stay in memory
        stages.update()
        stages.set_postfix_str("parity")
        q.gated_parity_stage(model, recipe, manifest, graphs, placed, bundle, fp32_held, fallbacks,
                             options.allow_low_parity)
    stages.update()


def _state_hash(state: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_adaptor_checkpoint(recipe: Recipe, path: Path) -> None:
    """--adaptor-checkpoint goes with --adaptor learned and must be distilled for this sampler, steps and clock.

    Another guidance scale is allowed (the user chose this checkpoint) but said on stderr: the adaptor learned the
    low-res features of trajectories guided that way, and its error grows away from it. The model's shipped
    adaptor is instead only used at its own guidance (``shipped_checkpoint``)."""
    import sys

    from .distill.checkpoint import check_schedule, read_checkpoint

    b = recipe.build
    if b.adaptor != "learned":
        raise InputError(f"--adaptor-checkpoint needs --adaptor learned (this build's adaptor is '{b.adaptor}')")
    checkpoint = read_checkpoint(path)
    check_schedule(checkpoint, b.sampler, b.steps, b.clock)
    distilled_at = checkpoint.training.get("guidance_scale")
    if distilled_at is not None and distilled_at != b.guidance_scale:
        print(f"cw-export: warning: adaptor checkpoint {path} was distilled at guidance {distilled_at:g}, this build "
              f"uses {b.guidance_scale:g} (cw-export distill --guidance {b.guidance_scale:g} makes a matching one)",
              file=sys.stderr)


def shipped_checkpoint(model: SDModel, recipe: Recipe):
    """The adaptor checkpoint the model ships with (only ``shapes`` has one), when it was distilled for this
    sampler, steps, clock and guidance and for these weights; else None."""
    from .distill.checkpoint import check_model, check_schedule, read_checkpoint

    path = shipped_adaptor(model)
    if path is None:
        return None
    checkpoint, b = read_checkpoint(path), recipe.build
    if checkpoint.training.get("guidance_scale") != b.guidance_scale:
        return None  # distilled on trajectories of another guidance scale
    try:
        check_schedule(checkpoint, b.sampler, b.steps, b.clock)
        check_model(checkpoint, model.source["sha256"],
                    default_adaptor_config(model.unet, model.text_encoder.config.hidden_size))
    except InputError:
        return None
    return checkpoint


def load_learned_adaptor(model: SDModel, recipe: Recipe, options: BuildOptions, latent: tuple[int, int],
                         shipped=None):
    """The --adaptor-checkpoint, checked against the model; without one, ``shipped`` (the model's own adaptor,
    from ``shipped_checkpoint``), else distilled now with the recipe's settings
    (cw_export.distill; cached, so the next build with the same settings reuses it)."""
    from .distill.checkpoint import check_model, check_schedule, read_checkpoint
    from .distill.train import distill_for_build

    b = recipe.build
    if options.adaptor_checkpoint is not None:
        checkpoint = read_checkpoint(options.adaptor_checkpoint)
    elif shipped is not None:
        checkpoint = shipped  # the model's own distilled adaptor (models/shapes_adaptor.safetensors)
    else:
        checkpoint = distill_for_build(model, recipe, latent, progress=options.progress)
    check_schedule(checkpoint, b.sampler, b.steps, b.clock)
    check_model(checkpoint, model.source["sha256"],
                default_adaptor_config(model.unet, model.text_encoder.config.hidden_size))
    return checkpoint


__all__ = ["BuildOptions", "build_bundle", "make_wiring", "np"]
