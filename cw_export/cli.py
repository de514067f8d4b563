"""Command line: ``cw-export [build options]``, ``cw-export run|validate|model ...``.

User-caused failures (``CwExportError``) are caught here, once, and printed as one line on stderr with exit code 2.
argparse's own errors are routed the same way instead of its multi-line usage dump.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .errors import CwExportError, InputError

SUBCOMMANDS = ("build", "run", "validate", "model")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise InputError(f"{self.prog}: {message}")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


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
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value
    return parse


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int("--steps"), help="denoising steps (default: recipe/bundle)")
    parser.add_argument("--clock", type=_positive_int("--clock"), help="full UNet every N steps (default: recipe)")
    parser.add_argument("--guidance", type=_finite_float("--guidance"), help="classifier-free guidance scale")


def build_parser() -> argparse.ArgumentParser:
    from .recipe import DEFAULT_TARGET

    parser = _Parser(prog="cw-export", description="Build a Clockwork-split ONNX bundle of a Stable Diffusion model.")
    parser.add_argument("--model", default="builtin", help="'builtin', 'tiny-random' or a diffusers pipeline folder")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="recipe name in recipes/ or a recipe .toml path")
    parser.add_argument("--out", type=Path, default=Path("bundle"), help="bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle (only if the build succeeds)")
    _add_schedule_flags(parser)
    parser.add_argument("--adaptor", choices=["identity", "learned"], help="clocked-step adaptor (default: recipe)")
    parser.add_argument("--adaptor-checkpoint", type=Path, help="learned adaptor weights (safetensors)")
    parser.add_argument("--height", type=_nonnegative_int("--height"), help="image height in pixels")
    parser.add_argument("--width", type=_nonnegative_int("--width"), help="image width in pixels")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export run", description="Run a bundle with numpy + onnxruntime only.")
    parser.add_argument("bundle", type=Path)
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text prompt (tokenized and encoded by the bundle's text encoder)")
    text.add_argument("--text-embeds", type=Path, help=".npz with 'cond' and 'uncond' [1, seq, dim] "
                      "(and optionally 'cond_pooled'/'uncond_pooled' [1, dim] for a learned adaptor)")
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--seed", type=int, help="seed for the initial unit Gaussian noise (numpy PCG64)")
    noise.add_argument("--init-latents", type=Path, help=".npy unit Gaussian noise [1, C, h, w]")
    _add_schedule_flags(parser)
    parser.add_argument("--latents-out", type=Path, required=True, help=".npy for the final latents (before VAE scaling)")
    parser.add_argument("--provider", default="cpu", help="execution provider: cpu")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 integrity check")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def validate_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export validate", description="Check a bundle's integrity and parity.")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--no-parity", action="store_true", help="integrity only, even if the source model is reachable")
    return parser


def model_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cw-export model", description="Write the built-in pipeline as a diffusers folder.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="builtin", help="built-in model name: builtin or tiny-random")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def cmd_build(argv: list[str]) -> int:
    from .build import BuildOptions, build_bundle
    from .recipe import load_recipe

    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.target).with_build(
        steps=args.steps, clock=args.clock, guidance_scale=args.guidance, adaptor=args.adaptor,
        height=args.height, width=args.width)
    out = build_bundle(recipe, BuildOptions(model=args.model, out=args.out, overwrite=args.overwrite,
                                            adaptor_checkpoint=args.adaptor_checkpoint, progress=not args.quiet))
    print(f"bundle written: {out}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from .runtime.cli_run import run_command

    return run_command(run_parser().parse_args(argv))


def cmd_validate(argv: list[str]) -> int:
    from .validate import validate_command

    return validate_command(validate_parser().parse_args(argv))


def cmd_model(argv: list[str]) -> int:
    from .atomic import check_output_path
    from .models.pipeline import BUILTIN_MODELS, load_model, save_model

    args = model_parser().parse_args(argv)
    if args.model not in BUILTIN_MODELS:
        raise InputError(f"--model must be a built-in model ({', '.join(BUILTIN_MODELS)}), got '{args.model}'")
    check_output_path(args.out.absolute(), args.overwrite)
    out = save_model(load_model(args.model), args.out, overwrite=args.overwrite)
    print(f"built-in pipeline written: {out}")
    return 0


COMMANDS = {"build": cmd_build, "run": cmd_run, "validate": cmd_validate, "model": cmd_model}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "build"
    try:
        return COMMANDS[command](argv)
    except CwExportError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"cw-export: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cw-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
