"""Measure prompt accuracy and the Fréchet distance of a model's images (full FP32 and Clockwork FP32).

  python tools/eval_builtin.py [--model shapes] [--split held_out|train] [--repeats 4]
                               [--clocks 1 2] [--steps 8] [--guidance G] [--json OUT] [--grid OUT.png]

``--model``: a diffusers folder or a built-in name. Prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cw_export.evaluate.generate import DEFAULT_GUIDANCE, generate_images
from cw_export.evaluate.torch_variants import evaluate_model, held_out_captions, image_grid, train_captions
from cw_export.models.declared import declared_guidance
from cw_export.models.pipeline import load_model

DEFAULT_MODEL = "shapes"  # cw_export/models/builtin


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--split", choices=["held_out", "train"], default="held_out")
    p.add_argument("--repeats", type=int, default=4, help="images per caption")
    p.add_argument("--clocks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, help="default: the model's declared guidance (cw_export.json), else 7.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--grid", type=Path, help="write a PNG of the full-FP32 images of the first 30 captions")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.guidance is None:
        declared = declared_guidance(args.model)
        args.guidance = DEFAULT_GUIDANCE if declared is None else declared
    model = load_model(args.model)
    captions = held_out_captions(args.repeats) if args.split == "held_out" else train_captions(args.repeats)
    result = evaluate_model(model, captions, clocks=tuple(args.clocks), seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance)
    # the weights' hash, not a path on this machine, identifies the model in the committed results
    result["settings"].update({"model": args.model if not Path(args.model).is_absolute() else Path(args.model).name,
                               "model_sha256": model.source.get("sha256"), "split": args.split,
                               "repeats": args.repeats})
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.grid:
        from PIL import Image

        images = generate_images(model, captions[:30], seed=args.seed, steps=args.steps,
                                 guidance_scale=args.guidance)
        Image.fromarray(image_grid(images, 6)).resize((6 * 96, 5 * 96), Image.NEAREST).save(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
