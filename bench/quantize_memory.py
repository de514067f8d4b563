"""Peak memory of quantizing one FP32 graph with the ort backend: onnxruntime's own calibrator vs the mapped one
(cw_export.quantize.mapped_calibration), each in a fresh process, same graph, same calibration samples (issue #21).

Not a test: it quantizes a multi-GB graph twice. Each variant runs ``ort_backend.quantize_graph`` in a child
process; the parent records the child's peak RSS (``ru_maxrss``), its wall time, and whether both QDQ graphs are the
same bytes (the .onnx and its .data).

    cw-export --model sd15-arch --target cpu-fp32 --height 64 --width 64 --out FP32
    python bench/quantize_memory.py --fp32-bundle FP32 --graph low_res --calibration CACHE_ENTRY \\
        --json bench/results/quantize_memory_sd15_64.json

CACHE_ENTRY: a calibration folder of the same model and size (``$CW_EXPORT_CACHE/calibration/<key>``, written by a
quantized build such as ``cw-export --model sd15-arch --target snapdragon-w8a16 --height 64 --width 64``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ort-calibrator", "mapped")


def child(fp32_onnx: Path, graph: str, calibration: Path, out: Path, variant: str, target: str, bits: int) -> None:
    """Quantize ``graph`` once (in this process) with ``variant``'s calibration."""
    from cw_export.calibrate.collect import CalibrationData
    from cw_export.quantize import GraphJob
    from cw_export.quantize import ort_backend
    from cw_export.recipe import load_recipe

    if variant == "ort-calibrator":  # the backend before mapped calibration: onnxruntime's quantize() calibrates
        from onnxruntime.quantization import quantize

        ort_backend.calibrate_mapped = lambda pre, reader, config, cache: None
        ort_backend.quantize_with_ranges = lambda pre, out_path, config, cache: quantize(str(pre), str(out_path),
                                                                                         config)
    meta = json.loads((calibration / "meta.json").read_text(encoding="utf-8"))
    entry = meta["graphs"][graph]
    data = CalibrationData(graph, [calibration / f for f in entry["files"]], entry["steps"])
    import onnx

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    del model
    settings = load_recipe(target).quantization
    job = GraphJob(graph, fp32_onnx, None, inputs, outputs, data, bits)
    ort_backend.quantize_graph(job, settings, out)


def measure(args, variant: str, out: Path) -> dict:
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, __file__, "--child", variant, "--fp32-bundle", str(args.fp32_bundle),
                    "--graph", args.graph, "--calibration", str(args.calibration), "--out", str(out),
                    "--target", args.target, "--bits", str(args.bits)], check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"variant": variant, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(peak_kib / 1024**2, 2), "peak_is_new_max": peak_kib > before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32-bundle", type=Path, required=True)
    parser.add_argument("--graph", default="low_res")
    parser.add_argument("--calibration", type=Path, required=True, help="a calibration cache entry folder")
    parser.add_argument("--target", default="snapdragon-w8a16", help="the recipe whose [quantization] applies")
    parser.add_argument("--bits", type=int, default=16, choices=(8, 16))
    parser.add_argument("--order", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="write the QDQ graphs here (default: a temporary folder)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    fp32_onnx = args.fp32_bundle / "graphs" / f"{args.graph}.onnx"
    if args.child:
        child(fp32_onnx, args.graph, args.calibration, args.out, args.child, args.target, args.bits)
        return
    rows = []
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="cw-quantize-memory-")) as tmp:
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: the smaller variant runs first so both peaks
        # are readable ("peak_is_new_max"); run again with --order reversed to see the other one if it is not
        for variant in args.order:
            rows.append(measure(args, variant, Path(tmp) / variant))
            print(rows[-1], flush=True)
        files = {v: sorted(p.name for p in (Path(tmp) / v).glob(f"{args.graph}.onnx*")) for v in args.order}
        same = len(args.order) == 2 and files[args.order[0]] == files[args.order[1]] and all(
            (Path(tmp) / args.order[0] / f).read_bytes() == (Path(tmp) / args.order[1] / f).read_bytes()
            for f in files[args.order[0]])
    size = sum(p.stat().st_size for p in fp32_onnx.parent.glob(f"{args.graph}.onnx*"))
    result = {"command": " ".join(["python", "bench/quantize_memory.py", *sys.argv[1:]]),
              "graph": args.graph, "fp32_graph_gib": round(size / 1024**3, 2), "bits": args.bits,
              "samples": len(json.loads((args.calibration / "meta.json").read_text())["graphs"][args.graph]["files"]),
              "rows": rows, "same_qdq_bytes": same, "python": platform.python_version()}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
