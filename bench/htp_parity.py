"""QNN HTP (emulated) vs CPU-EP QDQ vs FP32: parity and emulation time per step of INT8 bundles (issue #4).

Not a test: it takes minutes, and emulated times depend on the machine and say nothing about a phone. For every
bundle (a quantized one, built with its parity record):
  1. parity on each provider with the bundle's own held-out prompts and seeds (``validate.measure_on_provider``, the
     numbers ``cw-export validate --provider P`` gates on): per-graph SQNR vs the FP32 torch graphs, final-latent
     PSNR vs the FP32 trajectory, and whether the recorded gate passes;
  2. time per denoising step on each provider: one image (8 steps unless the bundle says otherwise), sessions
     created and one warm-up image run before timing; medians per step kind (full / clocked).

    python bench/htp_parity.py --bundle builtin=/tmp/bundle --bundle sd15-arch@64=/tmp/sd15_64 \
        --json bench/results/htp_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROVIDERS = ("cpu", "qnn-htp")


def step_times(bundle: Path, provider: str) -> dict:
    """Median seconds per full and clocked step of one image on ``provider`` (after a warm-up image)."""
    from cw_export.runtime.pipeline import BundleRunner

    runner = BundleRunner(bundle, provider=provider)
    hidden, pooled = runner.encode_prompt("a red triangle on the left")
    noise = np.random.default_rng(0).standard_normal(runner.latent_shape(), dtype=np.float32)
    runner.generate(hidden, pooled, noise)  # warm-up: session creation and first-run costs
    marks, kinds = [time.perf_counter()], []

    def on_step(i: int, kind: str, slots: dict) -> None:
        marks.append(time.perf_counter())
        kinds.append(kind)

    runner.generate(hidden, pooled, noise, on_step=on_step)
    seconds = np.diff(marks)  # each step's graphs (the guidance + sampler update of the step before included)
    by_kind = {k: [float(s) for s, kk in zip(seconds, kinds) if kk == k] for k in dict.fromkeys(kinds)}
    return {"per_step_s": {k: round(statistics.median(v), 3) for k, v in by_kind.items()},
            "image_s": round(float(seconds.sum()), 2), "steps": len(kinds)}


def measure_bundle(bundle: Path) -> dict:
    from types import SimpleNamespace

    from cw_export.models.pipeline import load_model
    from cw_export.parity.measure import failures
    from cw_export.contract.manifest import read_manifest
    from cw_export.validate.parity import measure_on_provider

    manifest = read_manifest(bundle)
    source = manifest["source_model"]
    model = load_model(source["name"] if source.get("kind") == "builtin" else source["path"])
    result = {"target": manifest["target"], "source_model": source.get("name") or source.get("path"),
              "latent": manifest["latent"]["shape"], "backend": manifest["recipe"]["quantization"]["backend"],
              "providers": {}}
    for provider in PROVIDERS:
        numbers = measure_on_provider(bundle, manifest, model, provider)
        if isinstance(numbers, str):
            raise SystemExit(f"error: {bundle}: {numbers}")
        found = failures(numbers, SimpleNamespace(**manifest["parity"]["thresholds"]))
        result["providers"][provider] = {
            "graph_sqnr_db": {name: r["sqnr_db"] for name, r in sorted(numbers["graphs"].items())},
            "final_latent_psnr_db": numbers["final_latent_psnr_db"], "gate_passed": not found,
            "gate_failures": found, **step_times(bundle, provider)}
    return result


def markdown(results: dict) -> str:
    lines = []
    for name, r in results.items():
        cpu, htp = r["providers"]["cpu"], r["providers"]["qnn-htp"]
        lines += [f"### {name} (`{r['target']}`, {r['backend']} backend, latent {r['latent']})", "",
                  "| graph | CPU EP QDQ vs FP32 (dB) | QNN HTP vs FP32 (dB) |", "|---|---|---|"]
        lines += [f"| `{g}` | {cpu['graph_sqnr_db'][g]:.2f} | {htp['graph_sqnr_db'].get(g, float('nan')):.2f} |"
                  for g in cpu["graph_sqnr_db"]]
        lines += [f"| final latent PSNR vs FP32 trajectory | {cpu['final_latent_psnr_db']:.2f} | "
                  f"{htp['final_latent_psnr_db']:.2f} |",
                  f"| parity gate | {'passed' if cpu['gate_passed'] else 'failed'} | "
                  f"{'passed' if htp['gate_passed'] else 'failed'} |", "",
                  "| provider | full step (s) | clocked step (s) | image, denoising loop (s) |", "|---|---|---|---|"]
        for provider, p in r["providers"].items():
            per = p["per_step_s"]
            lines.append(f"| {provider} | {per.get('full', float('nan')):.3f} | {per.get('clocked', float('nan')):.3f} "
                         f"| {p['image_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, help="NAME=PATH of a quantized bundle")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    results = {}
    for item in args.bundle:
        name, _, path = item.partition("=")
        results[name] = measure_bundle(Path(path))
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
               "command": "python bench/htp_parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "bundles": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(markdown(results["bundles"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
