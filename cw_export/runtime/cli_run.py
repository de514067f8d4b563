"""``cw-export run``: load inputs, run a bundle, write the latents (numpy + onnxruntime only)."""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import write_file_atomic
from ..errors import InputError
from .pipeline import BundleRunner


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


def check_output_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"--latents-out is a folder: {path}")
    if not path.parent.is_dir():
        raise InputError(f"folder of --latents-out does not exist: {path.parent}")


def run_command(args: argparse.Namespace) -> int:
    check_output_file(args.latents_out)
    runner = BundleRunner(args.bundle, provider=args.provider, verify=not args.no_verify)
    if args.prompt is not None:
        hidden, pooled = runner.encode_prompt(args.prompt)
    else:
        hidden, pooled = load_text_embeds(args.text_embeds)
        if pooled is None and "adaptor" in runner.manifest["graphs"]:
            raise InputError("this bundle's learned adaptor needs 'cond_pooled' and 'uncond_pooled' in --text-embeds")
    shape = runner.latent_shape()
    if args.init_latents is not None:
        noise = _load_npy(args.init_latents, "--init-latents")
    else:
        noise = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    trajectory = runner.generate(hidden, pooled, noise, steps=args.steps, clock=args.clock,
                                 guidance_scale=args.guidance, progress=not args.quiet)
    buffer = io.BytesIO()
    np.save(buffer, trajectory.latents)
    write_file_atomic(args.latents_out, buffer.getvalue())
    kinds = "".join("F" if k == "full" else "c" for k in trajectory.kinds)
    print(f"latents written: {args.latents_out} (steps {len(kinds)}: {kinds})")
    return 0
