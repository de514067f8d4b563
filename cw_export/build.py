"""Build a bundle: load -> split -> export graphs -> manifest, written atomically (the main job).

Steps:
  1. load the model and apply the recipe (shapes, schedule, sampler)
  2. split the UNet at the Stage-1 cut and build the adaptor
  3. make example inputs from a real prompt and the first denoising step
  4. export every graph to ONNX and measure torch-vs-onnxruntime parity
  5. write tokenizer files and manifest.json; list every file with sha256 and size
The whole bundle is built in a temporary folder and renamed into place only when every step succeeded.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .adaptor import ADAPTOR_KINDS, build_adaptor, default_adaptor_config
from .atomic import atomic_directory, check_output_path
from .errors import InputError, ParityError
from .export import ExportResult, export_graph
from .models.pipeline import SDModel, check_model_spec, load_model, write_tokenizer_files
from .progress import progress_bar
from .recipe import Recipe
from .runtime import schedulers
from .runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, list_files, manifest_bytes
from .runtime.schedule import check_steps_and_clock, step_kinds
from .split import split_unet

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


class TextEncoderGraph(torch.nn.Module):
    """input_ids -> (encoder_hidden_states, pooled_text): the two text tensors the UNet and the adaptor need."""

    def __init__(self, text_encoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def make_wiring(num_skips: int, adaptor: str) -> dict:
    """Which slot each graph input reads and each output writes, per step kind (the manifest's contract)."""
    skips = {f"skip_{i}": f"skip_{i}" for i in range(num_skips)}
    graphs = {
        "high_res_in": {"inputs": {"sample": "sample", "timestep": "timestep",
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
        "step_inputs": ["sample", "timestep", "encoder_hidden_states", "pooled_text"],
        "graphs": graphs,
        "steps": {"full": ["high_res_in", "low_res", "high_res_out"], "clocked": clocked},
        "clocked_aliases": aliases,
        "cache": {"r_out_prev": "r_out"},
        "step_output": "noise_pred",
        "guidance": "noise = noise_pred[0] + guidance_scale * (noise_pred[1] - noise_pred[0]); batch = [uncond, cond]",
    }


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
            "sample": sample, "timestep": timestep}


def export_all(model: SDModel, recipe: Recipe, graphs_dir: Path, latent_hw_: tuple[int, int], table: dict,
               adaptor_state: dict | None, progress: bool) -> tuple[dict[str, ExportResult], int]:
    """Export text_encoder, high_res_in, low_res, high_res_out (and the learned adaptor)."""
    split = split_unet(model.unet)
    ex = example_inputs(model, split, *latent_hw_, table)
    ehs = ex["encoder_hidden_states"]
    with torch.no_grad():
        temb, r_in, *skips = split.high_res_in(ex["sample"], ex["timestep"], ehs)
        r_out = split.low_res(r_in, temb, ehs)
    skip_inputs = dict(zip(split.skip_names, skips))
    jobs = {
        "text_encoder": (TextEncoderGraph(model.text_encoder), {"input_ids": ex["input_ids"]},
                         ["encoder_hidden_states", "pooled_text"]),
        "high_res_in": (split.high_res_in, {"sample": ex["sample"], "timestep": ex["timestep"],
                                            "encoder_hidden_states": ehs}, ["temb", "r_in", *split.skip_names]),
        "low_res": (split.low_res, {"r_in": r_in, "temb": temb, "encoder_hidden_states": ehs}, ["r_out"]),
        "high_res_out": (split.high_res_out, {"r_out": r_out, "temb": temb, "encoder_hidden_states": ehs,
                                              **skip_inputs}, ["noise_pred"]),
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
        "wiring": make_wiring(num_skips, b.adaptor),
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
    }


def build_bundle(recipe: Recipe, options: BuildOptions) -> Path:
    """The main job. Returns the bundle path; on any failure nothing is left at ``options.out``."""
    check_build_settings(recipe)
    out = Path(options.out).absolute()
    check_output_path(out, options.overwrite)
    if recipe.build.adaptor == "learned" and options.adaptor_checkpoint is None:
        raise InputError("--adaptor learned needs --adaptor-checkpoint (distillation is a separate stage)")
    check_model_spec(options.model)
    with progress_bar(total=4, enabled=options.progress, desc="build", unit="stage") as stages:
        return _build(recipe, options, out, stages)


def _build(recipe: Recipe, options: BuildOptions, out: Path, stages) -> Path:
    stages.set_postfix_str("load model")
    model = load_model(options.model)
    latent = latent_hw(model, recipe)
    table = schedulers.build_step_table(recipe.build.sampler, model.scheduler_config, recipe.build.steps)
    adaptor_state = None
    if options.adaptor_checkpoint is not None:
        adaptor_state = load_adaptor_checkpoint(options.adaptor_checkpoint)
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
        manifest["files"] = list_files(tmp)
        (tmp / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
        stages.update()
    return out


def load_adaptor_checkpoint(path: Path) -> dict:
    """Adaptor weights from a safetensors file written by ``cw-export distill``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"adaptor checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # boundary: corrupt user file
        raise InputError(f"cannot read adaptor checkpoint {path}: {exc}") from None


__all__ = ["BuildOptions", "build_bundle", "make_wiring", "np"]
