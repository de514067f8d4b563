"""QNN context binaries of a quantized bundle's graphs: compile time, size, load time, and the compiled graph's
outputs vs the same QDQ graph on the CPU EP (issue #4).

Not a test: on SD 1.5-size graphs it takes minutes (the emulated HTP runs on the CPU). For every quantized graph of
the bundle: compile it for ``--soc`` with onnxruntime-qnn (``context_binaries.generate_context``, the settings of
``cw-export --soc``) into a scratch folder, load the EPContext model back (``load_context``), run it once on seeded
random inputs (``time_features`` clipped to its [-1, 1] range) and compare with the CPU EP on the QDQ graph (SQNR per
output). The bundle itself is not changed.

    python bench/htp_context.py --bundle /tmp/sd15_64 --soc SM8650 --json bench/results/htp_context_sd15_64.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def random_feeds(inputs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the manifest's shapes: token ids in [0, 100), time features in [-1, 1], normal otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        if "int" in spec["dtype"]:
            feeds[spec["name"]] = rng.integers(0, 100, spec["shape"]).astype(spec["dtype"])
        else:
            values = rng.standard_normal(spec["shape"])
            feeds[spec["name"]] = (np.clip(values, -1, 1) if spec["name"] == "time_features" else values).astype(
                np.float32)
    return feeds


def measure(bundle: Path, soc_name: str) -> dict:
    from cw_export.quantize.qnn.context_binaries import generate_context, load_context, load_socs
    from cw_export.parity.measure import sqnr_db
    from cw_export.contract.manifest import read_manifest
    from cw_export.runtime.sessions import create_session, manifest_session_config

    manifest = read_manifest(bundle)
    soc, config = load_socs()[soc_name], manifest_session_config(manifest)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cw-htp-context-") as scratch:
        for name, spec in manifest["graphs"].items():
            if spec.get("precision", "fp32") == "fp32":
                continue
            start = time.perf_counter()
            model, binary = generate_context(bundle / spec["file"], Path(scratch) / f"{name}_ctx.onnx", soc, config,
                                             name=name)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            session = load_context(model)
            load_s = time.perf_counter() - start
            feeds = random_feeds(spec["inputs"])
            start = time.perf_counter()
            on_htp = session.run(None, feeds)
            run_s = time.perf_counter() - start
            on_cpu = create_session(bundle / spec["file"], config=config).run(None, feeds)
            rows[name] = {"compile_s": round(compile_s, 1), "load_s": round(load_s, 1), "run_s": round(run_s, 1),
                          "binary_mb": round(binary.stat().st_size / 1e6, 1),
                          "sqnr_vs_cpu_ep_db": {o["name"]: round(sqnr_db(c, h), 1)
                                                for o, c, h in zip(spec["outputs"], on_cpu, on_htp)}}
            print(name, rows[name], flush=True)
    return {"soc": soc_name, "soc_model": soc.soc_model, "htp_arch": soc.htp_arch, "graphs": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a quantized bundle")
    parser.add_argument("--soc", default="SM8650", help="a SoC of recipes/socs.toml")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    result = {"command": "python bench/htp_context.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **measure(args.bundle, args.soc)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
