"""Wall-clock benchmark of bundles in onnxruntime on the CPU: clock 1 (every step full) vs clock 2 (issue #8).

Not a test: it takes minutes and its numbers depend on the machine and its load. For every bundle:
  1. load it with the runtime (``BundleRunner``: numpy + onnxruntime, the bundle's recorded session settings),
     encode one prompt with the bundle's text encoder (timed), fix the initial noise (seed 0);
  2. warm up: one image per clock setting (session creation, allocator growth, first-run kernel selection);
  3. ``--runs`` rounds, each timing one image per clock setting, interleaved (A B A B ...) so that drifting machine
     load hits both settings alike; every step and every graph call is timed too;
  4. medians: wall time per image (the denoising loop: UNet graphs + guidance + sampler), per step kind, per graph;
     the FLOP saving from ``cw_export.bundle.flops`` (ONNX count) and how much of it the wall clock realised.
Writes ``--json`` and the markdown table ``--md`` (text below the KEEP marker of an existing file is kept).

    python bench/wallclock.py --bundle builtin=/tmp/bench_builtin --bundle sd15-arch@256=/tmp/sd15_256 \
        --runs 5 --json docs/benchmarks.json --md docs/benchmarks.md
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by file path

from step_timing import add_step_times, step_medians, time_steps  # noqa: E402

KEEP_MARKER = "<!-- everything below this line is kept when bench/wallclock.py rewrites the file -->"
PROMPT = "a red triangle on the left of a blue square"


class TimedRunner:
    """A BundleRunner whose graph calls and steps are timed."""

    def __init__(self, bundle: Path, threads: int = 0) -> None:
        from cw_export.runtime.pipeline import BundleRunner

        self.runner = BundleRunner(bundle, threads=threads)
        self.graph_times: dict[str, list[float]] = {}
        original = self.runner.run_graph

        def timed(graph, slots):
            start = time.perf_counter()
            original(graph, slots)
            self.graph_times.setdefault(graph, []).append(time.perf_counter() - start)

        self.runner.run_graph = timed

    def image(self, hidden, pooled, noise, steps: int, clock: int) -> tuple[float, list[tuple[str, float]]]:
        """Seconds for one denoising loop and (kind, seconds) per step (a step ends when its graphs have run)."""
        return time_steps(lambda on_step: self.runner.generate(hidden, pooled, noise, steps=steps, clock=clock,
                                                               on_step=on_step))


def bench_bundle(label: str, bundle: Path, steps: int, clocks: list[int], runs: int, warmup: int,
                 threads: int = 0) -> dict:
    from cw_export.bundle.flops import inspect_bundle

    timed = TimedRunner(bundle, threads)
    manifest = timed.runner.manifest
    start = time.perf_counter()
    hidden, pooled = timed.runner.encode_prompt(PROMPT)
    text_s = time.perf_counter() - start
    noise = np.random.default_rng(0).standard_normal(timed.runner.latent_shape()).astype(np.float32)
    load_before = os.getloadavg()
    for _ in range(warmup):
        for clock in clocks:
            timed.image(hidden, pooled, noise, steps, clock)
    timed.graph_times.clear()
    images: dict[int, list[float]] = {c: [] for c in clocks}
    step_times: dict[int, dict[str, list[float]]] = {c: {} for c in clocks}
    for _ in range(runs):
        for clock in clocks:
            total, per_step = timed.image(hidden, pooled, noise, steps, clock)
            images[clock].append(total)
            add_step_times(step_times[clock], per_step)
    load_after = os.getloadavg()
    base = clocks[0]
    rows = {}
    for clock in clocks:
        flop = inspect_bundle(bundle, steps, clock)["schedule"]
        median = statistics.median(images[clock])
        wall_saving = 100.0 * (1 - median / statistics.median(images[base]))
        rows[str(clock)] = {
            "image_s_median": round(median, 4), "image_s_all": [round(t, 4) for t in images[clock]],
            "step_s_median": step_medians(step_times[clock], 4),
            "flops_per_image": flop["clocked_flops"], "flop_saving_pct": flop["saving_pct"],
            "conv_linear_saving_pct": flop["conv_linear"]["saving_pct"],
            "wall_saving_pct": round(wall_saving, 2),
            "realised_pct": round(100.0 * wall_saving / flop["saving_pct"], 1) if flop["saving_pct"] else None,
        }
    return {
        "label": label, "bundle": str(bundle), "target": manifest.get("target"),
        "source_model": manifest.get("source_model", {}).get("name") or manifest.get("source_model", {}).get("kind"),
        "image_size": manifest["latent"]["image_size"], "latent_shape": manifest["latent"]["shape"],
        "precision": sorted({g.get("precision", "?") for g in manifest["graphs"].values()}),
        "steps": steps, "runs": runs, "warmup": warmup, "threads": threads, "text_encoder_s": round(text_s, 4),
        "graph_s_median": {g: round(statistics.median(v), 4) for g, v in sorted(timed.graph_times.items())},
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
        "clocks": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Wall-clock benchmarks (onnxruntime, CPU)",
        "",
        "Generated by `bench/wallclock.py`; every number below comes from this command:",
        "",
        f"    {results['command']}",
        "",
        f"Machine: {results['machine']['cpus']} CPU cores, onnxruntime {results['machine']['onnxruntime']}, "
        f"Python {results['machine']['python']}; the machine is shared (load averages per bundle below).",
        "Image time = the denoising loop (UNet graphs + guidance + sampler), median over runs; text encoder and VAE",
        "decoder run once per image and are not included. FLOP saving = `cw-export inspect` (all FLOPs, batch 1; the",
        "conv+linear saving in brackets). Realised = wall-clock saving / FLOP saving.",
        "",
        "| bundle | image | precision | clock | image s (median) | full step s | clocked step s | wall saving | "
        "FLOP saving | realised | load avg (1 min) before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["bundles"]:
        for clock, row in b["clocks"].items():
            steps = row["step_s_median"]
            lines.append(
                f"| {b['label']} | {'x'.join(map(str, b['image_size']))} | {'/'.join(b['precision'])} | {clock} | "
                f"{row['image_s_median']:.3f} | {steps.get('full', float('nan')):.3f} | "
                f"{steps['clocked']:.3f} |" if "clocked" in steps else
                f"| {b['label']} | {'x'.join(map(str, b['image_size']))} | {'/'.join(b['precision'])} | {clock} | "
                f"{row['image_s_median']:.3f} | {steps.get('full', float('nan')):.3f} | - |")
            lines[-1] += (f" {row['wall_saving_pct']:.1f}% | {row['flop_saving_pct']:.1f}% "
                          f"({row['conv_linear_saving_pct']:.1f}%) | "
                          f"{'-' if row['realised_pct'] is None or clock == '1' else str(row['realised_pct']) + '%'} | "
                          f"{b['load_avg_before'][0]} / {b['load_avg_after'][0]} |")
    lines += ["", "Median seconds per graph call (batch 2 for the UNet parts):", "",
              "| bundle | " + " | ".join(["text_encoder (once)", "high_res_in", "low_res", "high_res_out"]) + " |",
              "|---|---|---|---|---|"]
    for b in results["bundles"]:
        g = b["graph_s_median"]
        lines.append(f"| {b['label']} | {b['text_encoder_s']:.3f} | " + " | ".join(
            f"{g[n]:.3f}" if n in g else "-" for n in ("high_res_in", "low_res", "high_res_out")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, help="LABEL=PATH (repeatable)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per session (0: its default, one per physical core)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    args = parser.parse_args(argv)

    import onnxruntime

    results = {
        "command": "python bench/wallclock.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "bundles": [],
    }
    for spec in args.bundle:
        label, _, path = spec.partition("=")
        print(f"benchmarking {label} ({path}) ...", flush=True)
        results["bundles"].append(bench_bundle(label, Path(path), args.steps, args.clocks, args.runs, args.warmup,
                                               args.threads))
        print(json.dumps(results["bundles"][-1]["clocks"], indent=1), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    kept = ""
    if args.md.is_file() and KEEP_MARKER in args.md.read_text(encoding="utf-8"):
        kept = args.md.read_text(encoding="utf-8").split(KEEP_MARKER, 1)[1]
    args.md.write_text(markdown(results) + "\n" + KEEP_MARKER + kept, encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
