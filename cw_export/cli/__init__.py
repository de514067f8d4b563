"""Command line: ``cw-export [build options]``, ``cw-export run|validate|model ...``.

User-caused failures (``CwExportError``) are caught here, once, and printed as one line on stderr with exit code 2.
argparse's own errors are routed the same way instead of its multi-line usage dump.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path

from ..errors import CwExportError, InputError
from ..quantize import A8_RANGES, LAYER_SWEEPS

SUBCOMMANDS = ("build", "run", "validate", "model", "inspect", "report", "distill", "evaluate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise InputError(f"{self.prog}: {message}")


def _int_at_least(name: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_int(name: str):
    return _int_at_least(name, 1)


def _finite_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got '{text}'") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got '{text}'")
        return value
    return parse


def _nonnegative_int(name: str):
    return _int_at_least(name, 0)


class _LoraAction(argparse.Action):
    """``--lora FILE``: one more LoRA, at scale 1 until a ``--lora-scale`` follows it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), [values, None]])


class _LoraScaleAction(argparse.Action):
    """``--lora-scale F``: the scale of the ``--lora`` just before it (each LoRA takes at most one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        loras = getattr(namespace, self.dest)
        if not loras:
            parser.error("--lora-scale must follow the --lora FILE it scales")
        if loras[-1][1] is not None:
            parser.error(f"--lora {loras[-1][0]} has two --lora-scale values; give one after each --lora")
        loras[-1][1] = values


def _lora_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora-scale must be a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--lora-scale must be a finite number, got '{text}'")
    return value


def _lora_specs(args: argparse.Namespace) -> tuple:
    from ..models.lora import LoraSpec

    return tuple(LoraSpec(path, 1.0 if scale is None else scale) for path, scale in args.loras)


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int("--steps"), help="denoising steps (default: recipe/bundle)")
    parser.add_argument("--clock", type=_positive_int("--clock"), help="full UNet every N steps (default: recipe)")
    parser.add_argument("--guidance", type=_finite_float("--guidance"), help="classifier-free guidance scale (default: "
                        "the one the model declares in its folder's cw_export.json, as the built-in model does; else "
                        "the recipe's)")


def build_parser() -> argparse.ArgumentParser:
    from ..recipe import DEFAULT_TARGET

    parser = _Parser(prog="cw-export", description="Build a Clockwork-split ONNX bundle of a Stable Diffusion model.")
    parser.add_argument("--model", default="builtin", help="a built-in model (builtin, tiny-random, tiny-sdxl, "
                        "sd15-arch, sd21-arch, sdxl-arch) or a diffusers pipeline folder (SD 1.x/2.x or SDXL)")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="recipe name in recipes/ or a recipe .toml path")
    parser.add_argument("--out", type=Path, default=Path("bundle"), help="bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle (only if the build succeeds)")
    _add_schedule_flags(parser)
    parser.add_argument("--adaptor", choices=["identity", "learned"],
                        help="clocked-step adaptor (default: the model's own distilled adaptor when it fits the "
                        "schedule, as for the built-in model; else the recipe's)")
    parser.add_argument("--adaptor-checkpoint", type=Path, help="learned adaptor weights (safetensors)")
    parser.add_argument("--lora", action=_LoraAction, dest="loras", default=[], type=Path, metavar="FILE",
                        help="LoRA weights (diffusers or kohya .safetensors) fused into the UNet and text encoder "
                        "before export; repeatable, applied in order (docs/lora.md)")
    parser.add_argument("--lora-scale", action=_LoraScaleAction, dest="loras", type=_lora_scale, metavar="F",
                        help="scale of the --lora just before it (default 1; 0 leaves the model unchanged)")
    parser.add_argument("--height", type=_nonnegative_int("--height"), help="image height in pixels")
    parser.add_argument("--width", type=_nonnegative_int("--width"), help="image width in pixels")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    quant = parser.add_argument_group("quantized targets (snapdragon-*)")
    quant.add_argument("--calibration", type=Path, metavar="FILE",
                       help="calibration prompt file: one prompt a line, blank lines and # comments ignored")
    quant.add_argument("--calibration-prompts", type=_positive_int("--calibration-prompts"), metavar="N",
                       help="number of calibration prompts (default: recipe)")
    quant.add_argument("--calibration-samples", type=_positive_int("--calibration-samples"), metavar="N",
                       help="cap of stored calibration inputs per graph (default: recipe)")
    quant.add_argument("--a8-sweep", choices=LAYER_SWEEPS,
                       help="how far the 8-bit activation sweep goes when a candidate graph misses the floors whole: "
                       "off = that graph stays 16-bit, block/layer = 8 bits per block/layer that keeps them, mac = "
                       "8 bits on the inputs of each Conv/MatMul that keeps them (default: recipe; each group costs "
                       "one scoring run of the graph: 'off' is the budget setting for SD 1.5-size models)")
    quant.add_argument("--a8-plan", type=Path, metavar="BUNDLE",
                       help="start from the 8-bit choices of an earlier bundle of the same model (e.g. swept at a "
                       "small --height/--width) instead of sweeping again: each graph keeps the longest prefix of "
                       "that bundle's 8-bit MAC list that passes this build's floors and gate (docs/quantization.md)")
    quant.add_argument("--a8-range", choices=A8_RANGES,
                       help="range setting of 8-bit activations: minmax, or percentile (clips rare outliers; "
                       "default: recipe)")
    quant.add_argument("--parity-prompts", type=_positive_int("--parity-prompts"), metavar="N",
                       help="number of held-out prompts parity is measured on (default: recipe)")
    quant.add_argument("--quant-backend", choices=["aimet", "ort"], help="quantization backend (default: recipe)")
    quant.add_argument("--allow-low-parity", action="store_true",
                       help="write the bundle even if it misses the recipe's parity thresholds (recorded)")
    quant.add_argument("--soc", action="append", metavar="NAME",
                       help="also compile each quantized graph to a QNN context binary for this Snapdragon SoC "
                       "(e.g. SM8650; repeatable or comma-separated; known SoCs: recipes/socs.toml); a graph that "
                       "does not place fully on the HTP fails the build (docs/qnn_htp.md)")
    return parser


def _apply_quantization_flags(recipe, args):
    """CLI overrides of the recipe's [quantization] / [parity] sections; only meaningful for quantized targets.
    The prompt sets the model declares (cw_export.models.declared) replace the recipe's; --calibration beats both."""
    from ..models.declared import declared_prompt_sets

    given = [flag for flag, value in (("--calibration", args.calibration),
                                      ("--calibration-prompts", args.calibration_prompts),
                                      ("--calibration-samples", args.calibration_samples),
                                      ("--a8-sweep", args.a8_sweep), ("--a8-plan", args.a8_plan),
                                      ("--a8-range", args.a8_range),
                                      ("--parity-prompts", args.parity_prompts),
                                      ("--quant-backend", args.quant_backend)) if value is not None]
    if args.allow_low_parity:
        given.append("--allow-low-parity")
    if args.soc:
        given.append("--soc")
    if given and not recipe.quantized:
        raise InputError(f"{', '.join(given)} only apply to quantized targets; target '{recipe.name}' is FP32")
    declared = declared_prompt_sets(args.model) if recipe.quantized else {}  # the model's own prompts, if any
    calibration = declared.get("calibration_set")
    if args.calibration is not None:
        from ..prompts import read_prompt_file

        read_prompt_file(args.calibration)  # a bad file fails here, before any heavy work
        calibration = str(args.calibration.absolute())
    return recipe.with_quantization(
        backend=args.quant_backend, calibration_set=calibration, calibration_prompts=args.calibration_prompts,
        calibration_samples=args.calibration_samples, a8_layer_sweep=args.a8_sweep, a8_range=args.a8_range,
    ).with_parity(heldout_prompts=args.parity_prompts, heldout_set=declared.get("heldout_set"))


def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export run", description="Run a bundle with numpy + onnxruntime only.")
    parser.add_argument("bundle", type=Path)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="text prompt (tokenized and encoded by the bundle's text encoder)")
    text.add_argument("--text-embeds", type=Path, help=".npz with float arrays 'cond' and 'uncond' [1, seq, dim]; "
                      "bundles with a learned adaptor also require 'cond_pooled' and 'uncond_pooled' [1, dim] "
                      "(identity-adaptor bundles ignore them)")
    text.add_argument("--grid", type=Path, help="prompt file: write a comparison grid (rows: prompts; columns: "
                      "full FP32, clockwork FP32, this bundle on each provider) to --image-out")
    parser.add_argument("--negative-prompt", help="with --prompt: text of the unconditional (negative) batch entry "
                        "of classifier-free guidance (default: the empty string)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--seed", type=_nonnegative_int("--seed"),
                       help="seed for the initial unit Gaussian noise: "
                       "numpy.random.default_rng(N).standard_normal(latent shape, dtype=float32), drawn directly in "
                       "float32 (drawing float64 and casting gives other latents)")
    noise.add_argument("--init-latents", type=Path, help=".npy unit Gaussian noise [1, C, h, w]")
    _add_schedule_flags(parser)
    parser.add_argument("--latents-out", type=Path, help=".npy for the final latents (before VAE scaling)")
    parser.add_argument("--image-out", type=Path, help=".png of the decoded image (bundle's VAE decoder)")
    parser.add_argument("--provider", default="cpu", help="execution provider: cpu or qnn-htp (quantized graphs on "
                        "the QNN HTP, CPU fallback disabled; FP32 graphs on the CPU; docs/qnn_htp.md)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 integrity check")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def validate_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export validate", description="Check a bundle's integrity and parity.")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--no-parity", action="store_true", help="integrity only, even if the source model is reachable")
    parser.add_argument("--provider", default="cpu", help="execution provider the quantized graphs' parity is measured "
                        "on: cpu (re-measures the manifest's numbers) or qnn-htp (per-graph SQNR vs FP32 torch on "
                        "the HTP, gated on the recorded thresholds; docs/qnn_htp.md)")
    parser.add_argument("--record", action="store_true", help="with --provider qnn-htp: write the numbers measured "
                        "there into the manifest (parity_by_provider) beside the CPU ones, and refresh the bundle's "
                        "hand-off README.md")
    parser.add_argument("--sample", type=_int_at_least("--sample", 1), metavar="N", help="with --provider qnn-htp: "
                        "instead of the whole gate trajectory, run each quantized graph on N of the inputs the "
                        "parity gate measured it on (regenerated from the FP32 trajectories) and compare per graph "
                        "with the CPU EP and FP32 torch, gated on the gate's per-graph SQNR threshold; trajectory "
                        "numbers are not measured in this mode (docs/qnn_htp.md)")
    parser.add_argument("--workers", type=_int_at_least("--workers", 1), metavar="N", help="with --sample: graphs "
                        "run in parallel worker processes, N at a time (default: as many as cores and available "
                        "memory allow)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="with --sample: write the per-graph and "
                        "per-sample numbers to OUT")
    parser.add_argument("--graph", action="append", metavar="NAME", help="with --sample: check only this quantized "
                        "graph (repeatable; e.g. the one that failed, on a model where each graph takes an hour on "
                        "the emulated HTP)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def model_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export model", description="Write the built-in pipeline as a diffusers folder, with "
                     "its cw_export.json and clockwork/adaptor.safetensors (docs/model_folder.md).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="builtin", help="built-in model name: builtin, tiny-random or tiny-sdxl")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def _guidance(args: argparse.Namespace) -> float | None:
    """--guidance, else the guidance the model declares (its folder's cw_export.json), else None: the recipe's."""
    from ..models.declared import check_declared, declared_guidance

    check_declared(args.model)
    return args.guidance if args.guidance is not None else declared_guidance(args.model)


def cmd_build(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # before importing torch: a mistyped flag fails in a fraction of a second
    from ..quantize.qnn.context_binaries import parse_socs

    socs = parse_socs(args.soc)  # an unknown SoC fails here, before any heavy work

    from ..build import BuildOptions, build_bundle
    from ..recipe import load_recipe

    recipe = load_recipe(args.target).with_build(
        steps=args.steps, clock=args.clock, guidance_scale=_guidance(args), adaptor=args.adaptor,
        height=args.height, width=args.width)
    recipe = _apply_quantization_flags(recipe, args)
    out = build_bundle(recipe, BuildOptions(model=args.model, out=args.out, overwrite=args.overwrite,
                                            adaptor_checkpoint=args.adaptor_checkpoint, progress=not args.quiet,
                                            allow_low_parity=args.allow_low_parity, socs=socs,
                                            model_adaptor=args.adaptor is None, loras=_lora_specs(args),
                                            a8_plan=args.a8_plan))
    print(f"bundle written: {out}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from .run import run_command, unverified_bundle_errors

    args = run_parser().parse_args(argv)
    with unverified_bundle_errors(args.bundle, args.no_verify):
        return run_command(args)


def cmd_validate(argv: list[str]) -> int:
    from .validate import validate_command

    return validate_command(validate_parser().parse_args(argv))


def cmd_model(argv: list[str]) -> int:
    from ..atomic import check_output_path
    from ..models.pipeline import BUILTIN_MODELS, check_out_apart, load_model, save_model

    args = model_parser().parse_args(argv)
    if args.model not in BUILTIN_MODELS:
        raise InputError(f"--model must be a built-in model ({', '.join(BUILTIN_MODELS)}), got '{args.model}'")
    check_output_path(args.out.absolute(), args.overwrite)
    check_out_apart(args.model, args.out)
    out = save_model(load_model(args.model), args.out, overwrite=args.overwrite)
    print(f"built-in pipeline written: {out}")
    return 0


def inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export inspect", description="Parameters and FLOPs per graph and per clock schedule "
                     "(batch 1; x2 with classifier-free guidance).")
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle to count from its ONNX graphs")
    parser.add_argument("--model", help="count a model instead: builtin, tiny-random, tiny-sdxl, sd15-arch, sd21-arch, "
                        "sdxl-arch or a folder")
    parser.add_argument("--steps", type=_positive_int("--steps"), help="denoising steps (default: bundle/recipe)")
    parser.add_argument("--clock", type=_positive_int("--clock"), help="full UNet every N steps (default: bundle/recipe)")
    parser.add_argument("--adaptor", choices=["identity", "learned"], default="identity", help="with --model")
    parser.add_argument("--height", type=_nonnegative_int("--height"), default=0, help="with --model: image height")
    parser.add_argument("--width", type=_nonnegative_int("--width"), default=0, help="with --model: image width")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON to this file")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export report", description="Regenerate a bundle's report.html (and, in place, its "
                     "hand-off README.md).")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, help="write the report here instead of into the bundle")
    return parser


def cmd_inspect(argv: list[str]) -> int:
    from .inspect import inspect_command

    return inspect_command(inspect_parser().parse_args(argv))


def cmd_report(argv: list[str]) -> int:
    """``cw-export report BUNDLE [--out FILE]``: regenerate the report; in place it also refreshes its manifest
    entry and the bundle's hand-off README.md."""
    from ..atomic import write_file_atomic
    from ..bundle.handoff import refresh_handoff
    from ..bundle.report import REPORT_NAME, render_report
    from ..bundle.rewrite import replace_generated
    from ..contract.manifest import read_manifest

    args = report_parser().parse_args(argv)
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    data = render_report(bundle, manifest)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(args.out, data)
        print(f"report written: {args.out}")
        return 0
    changed = replace_generated(bundle, manifest, REPORT_NAME, data)
    print(f"report {'written' if changed else 'unchanged'}: {bundle / REPORT_NAME}")
    refresh_handoff(bundle, manifest if changed else None)  # manifest.json written once, with both hashes
    return 0


def distill_parser() -> argparse.ArgumentParser:
    from ..distill import DEFAULT_EPOCHS
    from ..recipe import DEFAULT_TARGET

    parser = _Parser(prog="cw-export distill", description="Train the learned adaptor by model-step distillation "
                     "on the teacher UNet's unrolled trajectories (prompts only). Data-parallel under "
                     "'accelerate launch' / 'torchrun' with the same command.")
    parser.add_argument("--model", default="builtin", help="'builtin', 'tiny-random' or a diffusers pipeline folder")
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="recipe whose sampler/steps/clock/guidance the adaptor is distilled for")
    parser.add_argument("--prompts", default="default", help="prompt file or builtin set name (default: default)")
    parser.add_argument("--num-prompts", type=_nonnegative_int("--num-prompts"), default=0,
                        help="use the first N prompts (default 0: all)")
    _add_schedule_flags(parser)
    parser.add_argument("--epochs", type=_positive_int("--epochs"), default=DEFAULT_EPOCHS, help="training epochs")
    parser.add_argument("--batch-size", type=_positive_int("--batch-size"), default=16,
                        help="global batch in (uncond, cond) pairs, split over data-parallel processes")
    parser.add_argument("--lr", type=_finite_float("--lr"), default=1e-4, help="Adam learning rate")
    parser.add_argument("--seed", type=_nonnegative_int("--seed"), default=0,
                        help="adaptor init, batch order and teacher noise (prompt k: seed + k)")
    parser.add_argument("--out", type=Path, default=Path("adaptor.safetensors"), help="checkpoint (.safetensors)")
    parser.add_argument("--out-model", type=Path, metavar="DIR", help="also write the model folder with this "
                        "adaptor as its clockwork/adaptor.safetensors and the guidance in its cw_export.json, so a "
                        "build from DIR uses it (docs/model_folder.md); --overwrite replaces an existing DIR")
    parser.add_argument("--resume", action="store_true", help="continue from OUT's resume state (.resume.pt)")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def cmd_distill(argv: list[str]) -> int:
    args = distill_parser().parse_args(argv)

    from ..distill.train import DistillOptions, distill
    from ..recipe import load_recipe

    build = load_recipe(args.target).with_build(steps=args.steps, clock=args.clock,
                                                guidance_scale=_guidance(args)).build
    source_folder = _out_model_source(args)  # before any heavy work
    result = distill(DistillOptions(
        model=args.model, prompts=args.prompts, num_prompts=args.num_prompts, steps=build.steps, clock=build.clock,
        guidance_scale=build.guidance_scale, sampler=build.sampler, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, out=args.out, resume=args.resume, overwrite=args.overwrite,
        progress=not args.quiet))
    if result.main_process:
        history = result.log["history"]
        loss = f", loss {history[-1]['loss']:.4g}" if history else ""
        print(f"adaptor checkpoint written: {result.checkpoint} (epoch {result.log['epochs_done']}{loss})")
        if source_folder is not None:
            from ..models.pipeline import save_model_with_adaptor

            out = save_model_with_adaptor(source_folder, args.out_model, result.checkpoint, build.guidance_scale,
                                          overwrite=args.overwrite)
            print(f"model folder written: {out}")
    return 0


def _out_model_source(args: argparse.Namespace) -> Path | None:
    """The model folder ``distill --out-model`` copies (None without the flag); a model generated in code has none."""
    if args.out_model is None:
        return None
    from ..atomic import check_output_path
    from ..models.declared import model_folder
    from ..models.pipeline import check_model_spec, check_out_apart

    check_model_spec(args.model)
    folder = model_folder(args.model)
    if folder is None:
        raise InputError(f"--out-model copies a model folder, and '{args.model}' is generated in code: write it "
                         f"first (cw-export model --model {args.model} --out DIR) and distil --model DIR")
    check_output_path(args.out_model.absolute(), args.overwrite)
    check_out_apart(args.model, args.out_model)
    return folder.resolve()


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export evaluate", description="Prompt accuracy and Fréchet distance (shape classifier "
                     "features) of a shapes-model bundle: full FP32, clockwork FP32 (torch) and the bundle itself.")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="captions, one a line (default: the held-out captions of the shapes data set)")
    parser.add_argument("--repeats", type=_positive_int("--repeats"), default=4,
                        help="images per caption (default 4: 120 images for the held-out captions)")
    parser.add_argument("--limit", type=_nonnegative_int("--limit"), default=0,
                        help="evaluate only the first N captions after repeats (default 0: all)")
    parser.add_argument("--seed", type=_nonnegative_int("--seed"), default=0,
                        help="image i starts from the noise of 'cw-export run --seed SEED+i'")
    parser.add_argument("--provider", nargs="+", action="extend", choices=["cpu", "qnn-htp"],
                        help="providers the bundle runs on (cpu always; qnn-htp adds clockwork_<p>_htp)")
    parser.add_argument("--adaptor-checkpoint", type=Path, metavar="CKPT",
                        help="torch weights of a learned-adaptor bundle's adaptor (default: found in the build cache)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write {variant: {prompt_accuracy, frechet, ...}}")
    parser.add_argument("--images-out", type=Path, metavar="DIR", help="write every image as DIR/<variant>/NNN.png")
    return parser


def cmd_evaluate(argv: list[str]) -> int:
    from .evaluate import evaluate_command

    return evaluate_command(evaluate_parser().parse_args(argv))


COMMANDS = {"build": cmd_build, "run": cmd_run, "validate": cmd_validate, "model": cmd_model,
            "inspect": cmd_inspect, "report": cmd_report,
            "distill": cmd_distill, "evaluate": cmd_evaluate}


# The user's machine rather than our code failed: disk full, quota, read-only or permission-denied paths, I/O errors.
# Such an OSError is reported as one line like a CwExportError; any other OSError is a bug and keeps its traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
ENVIRONMENT_ERRNOS = WRITE_ERRNOS | {errno.EACCES, errno.EPERM, errno.EIO}


def environment_error_message(exc: OSError) -> str | None:
    """'no space left on device writing /out/bundle/graphs/low_res.onnx' for an environment OSError, else None."""
    from ..atomic import final_path

    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    reason = (exc.strerror or os.strerror(exc.errno)).lower()
    path = final_path(exc.filename) if exc.filename is not None else "(path unknown)"
    return f"{reason} writing {path}" if exc.errno in WRITE_ERRNOS else f"{reason}: {path}"


def main(argv: list[str] | None = None) -> int:
    from ..atomic import Terminated, sigterm_raises

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "build"
    try:
        with sigterm_raises():  # SIGTERM cleans up like SIGINT: no temporary folder or file is left behind
            return COMMANDS[command](argv)
    except (CwExportError, OSError) as exc:
        message = str(exc) if isinstance(exc, CwExportError) else environment_error_message(exc)
        if message is None:
            raise
        message = " ".join(message.split()) or type(exc).__name__
        print(f"cw-export: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cw-export: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("cw-export: terminated", file=sys.stderr)
        return 128 + 15  # the shell's status of a process ended by SIGTERM


if __name__ == "__main__":
    sys.exit(main())
