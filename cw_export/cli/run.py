"""``cw-export run``: load inputs, run a bundle, write the latents (numpy + onnxruntime only)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import write_file_atomic
from ..errors import BundleError, InputError
from ..runtime.image import encode_png
from ..runtime.noise import seeded_noise
from ..runtime.pipeline import BundleRunner


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read {what} {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise InputError(f"{what} {path} must hold one float array")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} {path} contains NaN or infinite values")
    return array.astype(np.float32)


def load_text_embeds(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """[uncond; cond] hidden states [2, seq, dim] and, when present, pooled [2, dim] from an .npz file."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"text embeddings file not found: {path}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read text embeddings {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"text embeddings {path} must be an .npz with arrays 'cond' and 'uncond'")
    with data:
        missing = [k for k in ("cond", "uncond") if k not in data.files]
        if missing:
            raise InputError(f"text embeddings {path} lack array(s) {missing} (found {data.files})")
        cond, uncond = data["cond"], data["uncond"]
        pooled = None
        if "cond_pooled" in data.files and "uncond_pooled" in data.files:
            pooled = np.concatenate([data["uncond_pooled"], data["cond_pooled"]]).astype(np.float32)
    for name, array in (("cond", cond), ("uncond", uncond)):
        if array.ndim != 3 or array.shape[0] != 1:
            raise InputError(f"text embeddings '{name}' must be [1, seq, dim], got {list(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise InputError(f"text embeddings '{name}' contain NaN or infinite values")
    if cond.shape != uncond.shape:
        raise InputError(f"'cond' {list(cond.shape)} and 'uncond' {list(uncond.shape)} differ in shape")
    return np.concatenate([uncond, cond]).astype(np.float32), pooled


def check_output_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise InputError(f"{flag} is a folder: {path}")
    if not path.parent.is_dir():
        raise InputError(f"folder of {flag} does not exist: {path.parent}")


def _landing(path: Path) -> set[Path]:
    """Where a write to ``path`` may land: its resolved folder with its own name (``write_file_atomic`` replaces a
    link there) and, for a link, its target."""
    return {path.parent.resolve() / path.name, path.resolve()}


def _same_file(a: Path, b: Path) -> bool:
    if _landing(a) & _landing(b):
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links


def check_output_paths(args: argparse.Namespace) -> None:
    """Outputs go outside the bundle (which ``run`` verified and must leave valid), never over an input or over each
    other: refused before any work, so nothing is written."""
    bundle = args.bundle.resolve()
    outputs = [(f, p) for f, p in (("--latents-out", args.latents_out), ("--image-out", args.image_out))
               if p is not None]
    inputs = [(f, p) for f, p in (("--init-latents", args.init_latents), ("--text-embeds", args.text_embeds),
                                  ("--grid", args.grid)) if p is not None]
    for k, (flag, path) in enumerate(outputs):
        check_output_file(path, flag)
        if any(where.is_relative_to(bundle) for where in _landing(path)):
            raise InputError(f"{flag} {path} is inside the bundle {args.bundle}; write outputs outside it")
        for other, given in inputs + outputs[:k]:
            if _same_file(path, given):
                raise InputError(f"{flag} and {other} name the same file: {path}")


def grid_command(args: argparse.Namespace) -> int:
    """--grid: desktop-side comparison picture (uses torch for the FP32 columns; see cw_export.grid)."""
    from ..grid import make_grid, save_grid_png
    from ..prompts import read_prompt_file

    if args.image_out is None:
        raise InputError("--grid needs --image-out FILE.png")
    check_output_paths(args)
    prompts = read_prompt_file(args.grid)
    result = make_grid(args.bundle, prompts, seed=0 if args.seed is None else args.seed)
    save_grid_png(result, args.image_out)
    print(f"grid written: {args.image_out} ({len(prompts)} prompts x {len(result.columns)} columns: "
          f"{', '.join(result.columns)})")
    return 0


@contextlib.contextmanager
def unverified_bundle_errors(bundle: Path, unverified: bool) -> Iterator[None]:
    """With ``--no-verify`` the bundle may hold anything: a graph onnxruntime refuses to load, or a manifest entry
    that is missing, is a one-line BundleError. A verified bundle holds exactly what the build wrote, so there such a
    failure is a bug and keeps its traceback."""
    if not unverified:
        yield
        return
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    try:
        yield
    except (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.NoSuchFile, ort_state.Fail, KeyError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BundleError(f"unverified bundle {bundle} is broken ({type(exc).__name__}: {detail}); "
                          "run 'cw-export validate' on it") from None


def check_adaptor_schedule(manifest: dict, steps: int | None, clock: int | None) -> None:
    """A learned adaptor is tied to the steps and clock it was distilled for (PAPER.md "Training"; the build refuses
    a checkpoint of another schedule), so a run that would call it on another schedule is refused too. Clock 1
    never calls it, and the identity adaptor has no schedule."""
    from ..contract.schedule import CLOCKED, step_kinds

    adaptor = manifest.get("adaptor") or {}
    training = adaptor.get("training") or {}
    if adaptor.get("kind") != "learned" or "steps" not in training:
        return
    schedule = manifest["schedule"]
    steps = schedule["steps"] if steps is None else steps
    clock = schedule["clock"] if clock is None else clock
    if CLOCKED in step_kinds(steps, clock) and (steps, clock) != (training["steps"], training["clock"]):
        raise InputError(f"this bundle's learned adaptor was distilled for {training['steps']} steps at clock "
                         f"{training['clock']}, not {steps} steps at clock {clock}; run with its schedule, with "
                         f"--clock 1, or build with an adaptor distilled for it (cw-export distill --steps {steps} "
                         f"--clock {clock})")


def run_command(args: argparse.Namespace) -> int:
    if args.negative_prompt is not None and args.prompt is None:
        raise InputError("--negative-prompt needs --prompt (with --text-embeds the negative prompt's embeddings are "
                         "the 'uncond' array)")
    if args.grid is not None:
        return grid_command(args)
    if args.prompt is None and args.text_embeds is None:
        raise InputError("give --prompt TEXT or --text-embeds FILE.npz (or --grid PROMPTS)")
    if args.seed is None and args.init_latents is None:
        raise InputError("give --seed N or --init-latents FILE.npy")
    if args.latents_out is None and args.image_out is None:
        raise InputError("give --latents-out FILE.npy and/or --image-out FILE.png")
    check_output_paths(args)
    runner = BundleRunner(args.bundle, provider=args.provider, verify=not args.no_verify)
    check_adaptor_schedule(runner.manifest, args.steps, args.clock)
    if args.prompt is not None:
        hidden, pooled = runner.encode_prompt(args.prompt, args.negative_prompt or "")
    else:
        hidden, pooled = load_text_embeds(args.text_embeds)
        if pooled is None and "adaptor" in runner.manifest["graphs"]:
            raise InputError("this bundle's learned adaptor needs 'cond_pooled' and 'uncond_pooled' in --text-embeds")
    shape = runner.latent_shape()
    if args.init_latents is not None:
        noise = _load_npy(args.init_latents, "--init-latents")
    else:
        noise = seeded_noise(shape, args.seed)
    trajectory = runner.generate(hidden, pooled, noise, steps=args.steps, clock=args.clock,
                                 guidance_scale=args.guidance, progress=not args.quiet)
    kinds = "".join("F" if k == "full" else "c" for k in trajectory.kinds)
    if args.latents_out is not None:
        buffer = io.BytesIO()
        np.save(buffer, trajectory.latents)
        write_file_atomic(args.latents_out, buffer.getvalue())
        print(f"latents written: {args.latents_out} (steps {len(kinds)}: {kinds})")
    if args.image_out is not None:
        write_file_atomic(args.image_out, encode_png(runner.decode(trajectory.latents)))
        print(f"image written: {args.image_out} (steps {len(kinds)}: {kinds})")
    return 0
