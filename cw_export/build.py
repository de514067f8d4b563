"""Build a bundle (the main job): one numbered sequence of stage calls, written atomically.

  1. load      the model folder (cw_export.models), checked against the recipe's size and the machine's memory;
               with --lora, each LoRA fused into its UNet and text encoder (cw_export.models.lora)
  2. adaptor   the learned adaptor, when the build uses one: a checkpoint, the model's own, or distilled now
               (cw_export.distill.for_build)
  3. export    split the UNet at the paper's cut and export every graph of the registry to FP32 ONNX, checked
               against torch (cw_export.export.stage, cw_export.split, cw_export.contract.graphs)
  4. tokenizer the CLIP BPE files beside the graphs
  5. records   the export's records: the fields fixed before quantization and the FP32 graph entries
               (cw_export.bundle.writer.BuildRecords)
  6. quantize  quantized targets only: calibrate on FP32 trajectories (cw_export.calibrate.stage) -> quantize each
               graph, with the a8 sweep (cw_export.quantize.stage) -> parity gate on held-out prompts, with its
               fallbacks (cw_export.parity.stage)
  7. context   with --soc: QNN context binaries of the quantized graphs (cw_export.quantize.qnn.context_binaries)
  8. write     report.html, README.md, the file table and manifest.json, assembled from the records
               (cw_export.bundle.writer)
Every stage returns a typed record (cw_export.contract.schema) and none writes into the manifest: the writer
assembles it once. The whole bundle is built in a temporary folder and renamed into place only when every step
succeeded.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .adaptor import ADAPTOR_KINDS
from .atomic import atomic_directory, check_output_path, clean_stale_temps, pause_point
from .bundle.writer import BuildRecords, base_records, write_bundle
from .contract.schedule import check_steps_and_clock
from .distill.for_build import check_adaptor_checkpoint, load_learned_adaptor, shipped_checkpoint, state_hash
from .errors import BundleError, InputError
from .export.stage import check_fp32_parity, export_all
from .models.lora import LoraSpec, check_loras, fuse_loras
from .models.memory_check import check_build_memory
from .models.pipeline import SDModel, check_model_spec, check_out_apart, load_model, write_tokenizer_files
from .progress import progress_bar
from .recipe import Recipe
from .runtime import schedulers


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs beside the recipe; None values fall back to the recipe."""

    model: str = "builtin"
    out: Path = Path("bundle")
    overwrite: bool = False
    adaptor_checkpoint: Path | None = None
    progress: bool = True
    allow_low_parity: bool = False  # write a quantized bundle even if it misses the recipe's parity thresholds
    socs: tuple[str, ...] = ()  # --soc: QNN context binaries for these SoCs (cw_export.quantize.qnn.context_binaries)
    # no --adaptor given: a model that ships a distilled adaptor fitting this schedule and these weights (the built-in
    # shapes model) builds with it; otherwise the recipe's adaptor. Measured on shapes, clock 2: prompt accuracy 76.7%
    # with its learned adaptor, 30.8% with the identity one (docs/builtin_model.md)
    model_adaptor: bool = False
    loras: tuple[LoraSpec, ...] = ()  # --lora FILE [--lora-scale F]: fused at load, in this order (docs/lora.md)
    a8_plan: Path | None = None  # --a8-plan BUNDLE: start from that bundle's 8-bit choices (cw_export.quantize.plan)


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



def build_bundle(recipe: Recipe, options: BuildOptions) -> Path:
    """The main job. Returns the bundle path; on any failure nothing is left at ``options.out``."""
    check_build_settings(recipe)
    out = Path(options.out).absolute()
    clean_stale_temps(out.parent)  # leftovers of killed builds go first, even if this build fails early
    check_output_path(out, options.overwrite)
    if options.adaptor_checkpoint is not None:
        check_adaptor_checkpoint(recipe, options.adaptor_checkpoint)  # before any heavy work
    check_model_spec(options.model)
    check_out_apart(options.model, out)
    loras = check_loras(tuple(options.loras))  # checked and hashed before any heavy work
    if recipe.quantized:
        from .quantize import check_settings
        from .calibrate.stage import check_prompt_sources

        check_settings(recipe.quantization)
        check_prompt_sources(recipe)
    plan = None
    if options.a8_plan is not None:
        from .quantize.plan import read_a8_plan

        if not recipe.quantized:
            raise InputError(f"--a8-plan only applies to quantized targets; target '{recipe.name}' is FP32")
        plan = read_a8_plan(options.a8_plan)  # a bad plan fails here, before any heavy work
        if recipe.quantization.backend != "ort" and any(plan.bits(g) == "8+16" for g in plan.graphs):
            raise InputError(f"--a8-plan {options.a8_plan} has per-MAC mixes, which only the ort backend builds; "
                             f"this build's backend is {recipe.quantization.backend}")
    if options.socs:
        from .quantize.qnn.context_binaries import check_context_settings

        check_context_settings(tuple(options.socs), recipe.quantized)
    total = 4 + 3 * recipe.quantized + bool(options.socs)
    with progress_bar(total=total, enabled=options.progress, desc="build", unit="stage") as stages:
        return _build(recipe, options, out, stages, loras, plan)


def _build(recipe: Recipe, options: BuildOptions, out: Path, stages, loras=(), plan=None) -> Path:
    # 1. load
    stages.set_postfix_str("load model")
    pause_point("load")
    model = fuse_loras(load_model(options.model), loras)
    latent = latent_hw(model, recipe)
    check_build_memory(model, latent, quantized=recipe.quantized)
    if plan is not None:
        from .quantize.plan import check_plan_model

        check_plan_model(plan, model.source)
    table = schedulers.build_step_table(recipe.build.sampler, model.scheduler_config, recipe.build.steps)
    # 2. adaptor
    wants_shipped = options.adaptor_checkpoint is None and (options.model_adaptor or recipe.build.adaptor == "learned")
    shipped = shipped_checkpoint(model, recipe) if wants_shipped else None
    if options.model_adaptor and shipped is not None:
        recipe = recipe.with_build(adaptor="learned")
    adaptor_checkpoint = None
    if recipe.build.adaptor == "learned":
        stages.set_postfix_str("learned adaptor")
        adaptor_checkpoint = load_learned_adaptor(model, recipe, options.adaptor_checkpoint, latent, shipped,
                                                  options.progress)
    adaptor_state = None if adaptor_checkpoint is None else adaptor_checkpoint.state_dict
    stages.update()
    with atomic_directory(out, overwrite=options.overwrite) as tmp:
        # 3. export
        stages.set_postfix_str("export graphs")
        results, num_skips = export_all(model, recipe, tmp / "graphs", latent, table, adaptor_state,
                                        options.progress)
        check_fp32_parity(results, recipe)
        stages.update()
        # 4. tokenizer
        stages.set_postfix_str("tokenizer")
        write_tokenizer_files(model, tmp / "tokenizer")
        if model.dual_text:
            write_tokenizer_files(model, tmp / "tokenizer_2", model.tokenizer_2_files)
        stages.update()
        # 5. records
        stages.set_postfix_str("manifest")
        records = base_records(model, recipe, results, num_skips, latent, table, tmp)
        records.loras = loras
        if adaptor_checkpoint is not None:
            records.adaptor.update(adaptor_checkpoint.provenance())
        # 6. quantize
        if recipe.quantized:
            quantize_bundle(model, recipe, records, tmp, adaptor_state, options, stages, plan)
        # 7. context binaries
        if options.socs:
            from .quantize.qnn.context_binaries import context_stage

            stages.set_postfix_str("context binaries")
            records.context_binaries = context_stage(tmp, records.manifest(), tuple(options.socs), options.progress)
            stages.update()
        # 8. write, then the checks `cw-export validate` runs without the source model: a build never leaves a
        # bundle its own validate rejects
        write_bundle(tmp, records)
        check_written_bundle(tmp)
        pause_point("manifest")
        stages.update()
    return out


def check_written_bundle(folder: Path) -> None:
    """Integrity, cross-format lint and wiring of the bundle just written, read back from disk as validate reads it
    (cw_export.validate.static_checks)."""
    from .contract.manifest import read_manifest
    from .validate import static_checks

    failed = [c for c in static_checks(folder, read_manifest(folder)) if not c.ok]
    if failed:
        raise BundleError(f"the written bundle fails its own validate: {failed[0].name}: {failed[0].detail}"
                          + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""))


def quantize_bundle(model: SDModel, recipe: Recipe, records: BuildRecords, bundle: Path,
                    adaptor_state: dict | None, options: BuildOptions, stages, plan=None) -> None:
    """Calibrate -> quantize -> parity gate, one stage function each; their records go into ``records``."""
    from .calibrate.stage import calibrate_stage
    from .export.torch_graphs import torch_graphs
    from .parity.stage import gated_parity_stage
    from .quantize.fallback import hold_fp32
    from .quantize.stage import quantize_stage

    stages.set_postfix_str("calibrate")
    manifest = records.manifest()
    graphs = torch_graphs(model, manifest, adaptor_state)
    adaptor_sha = None if adaptor_state is None else state_hash(adaptor_state)
    calibration, records.calibration = calibrate_stage(model, recipe, manifest, graphs, adaptor_sha,
                                                       options.progress)
    stages.update()
    stages.set_postfix_str("quantize")
    with tempfile.TemporaryDirectory(prefix="cw-a16-fallback-") as held:  # like the quantizers' scratch folders
        fallback_dir = Path(held)
        fp32_held = hold_fp32(recipe, records.graphs, bundle, fallback_dir)
        quantized = quantize_stage(recipe, records.manifest(), records.graphs, graphs, calibration, bundle,
                                   options.progress, fallback_dir, plan)
        records.graphs = quantized.entries
        del calibration  # the parity stage measures on held-out prompts; these samples need not stay in memory
        stages.update()
        stages.set_postfix_str("parity")
        records.parity = gated_parity_stage(model, recipe, records, graphs, quantized.placed, bundle, fp32_held,
                                            quantized.fallbacks, options.allow_low_parity)
    stages.update()
