"""Quantization parity benchmark: per-graph SQNR and final-latent PSNR for W8A16 / mixed / W8A8 x aimet / ort.

Each cell is one real ``cw-export`` build (``build_bundle``, with ``--allow-low-parity`` so that numbers below the
gate are still recorded); the numbers are the ones the build measured and wrote into its manifest (held-out prompts,
onnxruntime with the recipe's session options, quantized vs FP32 torch). Results go to a markdown table.

    python bench/quant_parity.py --model tiny-random --out docs/quant_parity_builtin.md
    python bench/quant_parity.py --model sd15-arch --height 32 --width 32 --calibration-prompts 4 \\
        --parity-prompts 2 --out docs/quant_parity_sd15.md

Not a timed test: it takes minutes per cell on 2 cores (hours for the SD 1.5 config).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

RECIPES = {"w8a16": "snapdragon-w8a16", "mixed": "snapdragon-int8", "w8a8": "snapdragon-w8a8"}
BACKENDS = ("aimet", "ort")
GRAPHS = ("text_encoder", "high_res_in", "low_res", "adaptor", "high_res_out", "vae_decoder")


def run_cell(args, recipe_name: str, backend: str, work: Path) -> dict:
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe
    from cw_export.contract.manifest import read_manifest

    recipe = load_recipe(recipe_name).with_build(height=args.height, width=args.width)
    recipe = recipe.with_quantization(backend=backend, calibration_prompts=args.calibration_prompts,
                                      calibration_samples=args.calibration_samples)
    recipe = recipe.with_parity(heldout_prompts=args.parity_prompts)
    out = work / f"{recipe_name}-{backend}"
    start = time.perf_counter()
    build_bundle(recipe, BuildOptions(model=args.model, out=out, overwrite=True, progress=False,
                                      allow_low_parity=True))
    manifest = read_manifest(out)
    parity = manifest["parity"]
    return {"seconds": time.perf_counter() - start,
            "precision": {g: manifest["graphs"][g]["precision"] for g in GRAPHS if g in manifest["graphs"]},
            "sqnr": {g: parity["graphs"][g]["sqnr_db"] for g in GRAPHS if g in parity["graphs"]},
            "min_step_psnr": min(r["latent_psnr_db"] for r in parity["steps"]),
            "final_psnr": parity["final_latent_psnr_db"],
            "final_psnr_worst_prompt": min(parity.get("final_latent_psnr_db_per_prompt",
                                                      [parity["final_latent_psnr_db"]])),
            "prompt_aggregate": parity.get("prompt_aggregate", "pooled"),
            "worst_ratio": max(parity["steps"], key=lambda r: abs(r["guidance_ratio"] - 1))["guidance_ratio"],
            "image_psnr_vs_clockwork": parity.get("image", {}).get("vs_clockwork_fp32", {}).get("psnr_db"),
            "image_psnr_vs_full": parity.get("image", {}).get("vs_full_fp32", {}).get("psnr_db"),
            "gate": "pass" if parity["gate"]["passed"] else "FAIL"}


def table(rows: list[tuple[str, str, dict]]) -> str:
    graphs = [g for g in GRAPHS if any(g in r.get("sqnr", {}) for _, _, r in rows)]
    head = ["recipe", "backend", *[f"{g} SQNR dB" for g in graphs], "min step PSNR dB", "final latent PSNR dB (worst prompt)",
            "worst guidance ratio", "image PSNR dB vs clockwork FP32 / vs full FP32", "gate", "precision", "build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe, backend, r in rows:
        if "error" in r:
            lines.append(f"| {recipe} | {backend} | " + " | ".join(["-"] * (len(head) - 3)) + f" | {r['error']} |")
            continue
        precision = ", ".join(f"{g}={p}" for g, p in r["precision"].items())
        lines.append("| " + " | ".join([recipe, backend, *[f"{r['sqnr'].get(g, float('nan')):.2f}" for g in graphs],
                                         f"{r['min_step_psnr']:.2f}", _final(r),
                                         f"{r['worst_ratio']:.4f}", _image(r), r["gate"], precision,
                                         f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def _final(r: dict) -> str:
    worst = r.get("final_psnr_worst_prompt")
    return f"{r['final_psnr']:.2f}" + ("" if worst is None else f" ({worst:.2f})")


def _image(r: dict) -> str:
    if r.get("image_psnr_vs_clockwork") is None:
        return "-"
    return f"{r['image_psnr_vs_clockwork']:.2f} / {r['image_psnr_vs_full']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cw-qbench-") as work:
        for short in args.recipes.split(","):
            for backend in args.backends.split(","):
                try:
                    result = run_cell(args, RECIPES[short], backend, Path(work))
                except Exception as exc:  # a failing cell is a finding to report, not a reason to stop
                    traceback.print_exc()
                    result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}
                rows.append((short, backend, result))
                print(short, backend, json.dumps(result), flush=True)
                write(args, argv, rows)  # after every cell: a long run stopped early keeps what it measured
    print(f"written: {args.out}")
    return 0


def write(args, argv: list[str] | None, rows: list) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    args.out.write_text(f"<!-- produced by: {command} -->\n\n{table(rows)}\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "cells": [
        {"recipe": recipe, "backend": backend, **result} for recipe, backend, result in rows]}, indent=1) + "\n",
        encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
