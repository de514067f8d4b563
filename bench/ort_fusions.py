"""FP32 bundle graphs under onnxruntime session variants: optimisation level and transformer-optimizer fusions (#19).

Not a test. For each graph named (default the three UNet parts) of an FP32 bundle:
  1. write a fused copy with ``onnxruntime.transformers.optimizer.optimize_model(model_type="unet")`` limited to the
     fusions that have CPU kernels (attention -> MultiHeadAttention, LayerNormalization, Gelu / BiasGelu,
     SkipLayerNorm); the unet defaults NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and packed QKV/KV
     produce contrib ops that only the CUDA / ROCm providers implement, so they are switched off;
  2. time one call on fixed random inputs (the manifest's shapes) per variant: ``all`` (what an FP32 bundle's manifest
     records), ``basic``, ``fused`` (the fused copy at ``all``); one session at a time (an SD 1.5 low_res session
     holds 3.3 GB), variants in the order A B C A B C ... with ``--rounds`` rounds of ``--runs`` calls each;
  3. report median seconds per call per variant, and each variant's max |difference| to ``all`` relative to max |all|.

    python bench/ort_fusions.py --bundle /tmp/sd15_256 --json bench/results/ort_fusions_sd15_256.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CPU_SAFE_OFF = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


def fuse(src: Path, dst: Path) -> dict:
    """The unet fusions with CPU kernels; returns onnxruntime's count of fused operators."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for name in CPU_SAFE_OFF:
        setattr(options, name, False)
    model = optimize_model(str(src), model_type="unet", optimization_options=options, opt_level=0, use_gpu=False)
    stats = model.get_fused_operator_statistics()
    model.save_model_to_file(str(dst), use_external_data_format=True)
    return {k: v for k, v in stats.items() if v}


def session(path: Path, level: str, threads: int):
    import onnxruntime as ort

    from cw_export.runtime.sessions import session_options

    return ort.InferenceSession(str(path), session_options(threads=threads, graph_optimization_level=level),
                                providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--graphs", nargs="+", default=["high_res_in", "low_res", "high_res_out"])
    parser.add_argument("--variants", nargs="+", default=["all", "basic", "fused"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    results = {"command": "python bench/ort_fusions.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "load_avg_before": [round(x, 2) for x in os.getloadavg()], "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="cw_fusions_") as tmp:
        for graph in args.graphs:
            spec = manifest["graphs"][graph]
            src = args.bundle / spec["file"]
            rng = np.random.default_rng(0)
            feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) for i in spec["inputs"]}
            paths = {level: src for level in ("all", "extended", "basic", "disable_all")}
            entry: dict = {"times_s": {v: [] for v in args.variants}}
            if "fused" in args.variants:
                paths["fused"] = Path(tmp) / f"{graph}_fused.onnx"
                start = time.perf_counter()
                entry["fused_operators"] = fuse(src, paths["fused"])
                entry["fuse_s"] = round(time.perf_counter() - start, 1)
                gc.collect()
            outputs: dict = {}
            for _ in range(args.rounds):
                for variant in args.variants:
                    sess = session(paths[variant], "all" if variant == "fused" else variant, args.threads)
                    out = sess.run(None, feeds)  # warm-up
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        sess.run(None, feeds)
                        entry["times_s"][variant].append(round(time.perf_counter() - start, 4))
                    outputs.setdefault(variant, out)
                    del sess
                    gc.collect()
            base = outputs["all"]
            entry["median_s"] = {v: round(statistics.median(t), 4) for v, t in entry["times_s"].items()}
            entry["max_rel_diff_vs_all"] = {
                v: float(max(np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(outputs[v], base)))
                for v in args.variants}
            results["graphs"][graph] = entry
            print(graph, json.dumps({k: entry[k] for k in entry if k != "times_s"}), flush=True)
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
