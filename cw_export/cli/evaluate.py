"""``cw-export evaluate BUNDLE``: the command line over ``cw_export.evaluate.bundle_variants.evaluate_bundle``."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from ..evaluate.bundle_variants import bundle_precision, check_shapes_bundle, evaluate_bundle, load_captions


def format_row(name: str, entry: dict) -> str:
    """One line of the table printed while the variants run."""
    if entry.get("error"):
        return f"{name:<26} not measured: {entry['error']}"
    attrs = " ".join(f"{k} {v:.3f}" for k, v in sorted(entry.get("attribute_accuracy", {}).items()))
    return (f"{name:<26} prompt accuracy {entry['prompt_accuracy']:.3f}  Fréchet {entry['frechet']:8.1f}  "
            f"({attrs}; {entry['n']} images, {entry['seconds']:.1f} s)")


def evaluate_command(args: argparse.Namespace) -> int:
    """``cw-export evaluate``: checks everything cheap first, then generates and scores every variant."""
    from .run import check_output_file
    from ..contract.manifest import read_manifest

    # 1. cheap checks, before torch is imported
    manifest = read_manifest(args.bundle)
    check_shapes_bundle(args.bundle, manifest)
    captions = load_captions(args.prompts, args.repeats, args.limit)
    if len(captions) < 2:
        raise InputError(f"the Fréchet distance needs at least 2 captions, got {len(captions)}")
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.images_out is not None:
        if args.images_out.exists() and not args.images_out.is_dir():
            raise InputError(f"--images-out is not a folder: {args.images_out}")
        if not args.images_out.parent.is_dir():
            raise InputError(f"folder of --images-out does not exist: {args.images_out.parent}")
    if args.adaptor_checkpoint is not None and manifest["adaptor"]["kind"] != "learned":
        raise InputError(f"--adaptor-checkpoint applies to learned-adaptor bundles; {args.bundle} uses the "
                         f"'{manifest['adaptor']['kind']}' adaptor")
    providers = tuple(dict.fromkeys(["cpu", *(args.provider or [])]))
    if "qnn-htp" in providers and bundle_precision(manifest) == "fp32":
        raise InputError(f"--provider qnn-htp runs a bundle's quantized graphs on the HTP; every graph of "
                         f"{args.bundle} is FP32 (all would run on the CPU); build a snapdragon-* target for the HTP")

    # 2-3. generate and score
    print(f"evaluating {args.bundle}: {len(captions)} captions, seed {args.seed}", flush=True)
    results = evaluate_bundle(args.bundle, captions, providers=providers, seed=args.seed,
                              adaptor_checkpoint=args.adaptor_checkpoint, images_out=args.images_out,
                              on_variant=lambda name, entry: print(format_row(name, entry), flush=True))

    # 4. outputs
    if args.images_out is not None:
        from ..atomic import write_file_atomic

        write_file_atomic(args.images_out / "captions.txt", ("\n".join(captions) + "\n").encode("utf-8"))
        print(f"images written: {args.images_out}/<variant>/NNN.png (image i: seed {args.seed} + i)")
    if args.json is not None:
        from ..atomic import write_file_atomic

        text = json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + "\n"
        write_file_atomic(args.json, text.encode("utf-8"))
        print(f"json written: {args.json}")
    return 0
