"""Time and peak RSS, per stage, of one ``cw-export`` build (issue #8: SD 1.5 must export on 2 cores / 24 GB).

Runs exactly the CLI's build path in this process (``cw_export.cli.main``) while
  * a sampler thread reads this process's RSS every ``--interval`` seconds, and
  * the stage functions of ``cw_export.build`` / ``cw_export.export.to_onnx`` are wrapped (scoped, undone on exit) to stamp
    start/end times, so every stage gets its wall time and the peak RSS seen while it ran.
The kernel's own peak (``ru_maxrss``) is reported beside the sampled peak, and the sampled peak of anonymous memory
(RSS less its file-backed and shared pages: what the kernel cannot drop, e.g. not the memory-mapped weights).

    nohup python bench/sd15_export.py --json bench/results/sd15_export_512.json -- \
        --model sd15-arch --target cpu-fp32 --out /tmp/sd15_512 --overwrite --quiet > /tmp/sd15_512.log 2>&1 &

Everything after ``--`` is passed to ``cw-export`` unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import psutil


class Timeline:
    """Nested stages with wall time and the peak RSS sampled while each was open."""

    def __init__(self, interval: float) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.open: list[dict] = []
        self.peak_rss = 0
        self.peak_anon = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._observe()
            self._stop.wait(self.interval)

    def _observe(self) -> None:
        info = self.process.memory_info()
        rss, anon = info.rss, info.rss - info.shared
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            for event in self.open:
                event["peak_rss"] = max(event["peak_rss"], rss)
                event["peak_anon"] = max(event["peak_anon"], anon)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._observe()

    @contextlib.contextmanager
    def stage(self, name: str):
        rss = self.process.memory_info().rss
        event = {"stage": name, "depth": len(self.open), "start_s": time.perf_counter() - self.t0,
                 "rss_before": rss, "peak_rss": rss, "peak_anon": 0}
        with self._lock:
            self.open.append(event)
            self.events.append(event)
        print(f"[{event['start_s']:8.1f} s] {name.strip()}", file=sys.stderr, flush=True)  # a build killed mid-way
        try:
            yield
        finally:
            self._observe()
            with self._lock:
                self.open.remove(event)
            event["wall_s"] = time.perf_counter() - self.t0 - event["start_s"]
            event["rss_after"] = self.process.memory_info().rss


def _wrap(timeline: Timeline, owner, attr: str, label):
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        name = label(*args, **kwargs) if callable(label) else label
        with timeline.stage(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    return lambda: setattr(owner, attr, original)


@contextlib.contextmanager
def instrumented(timeline: Timeline, notes: dict, skip_memory_check: bool):
    """Scoped patches of the build's stage functions; all undone on exit."""
    import torch

    from cw_export import build
    from cw_export.bundle import writer
    from cw_export.calibrate import stage as calibrate_stage
    from cw_export.export import stage as export_stage
    from cw_export.export import to_onnx as export
    from cw_export.parity import stage as parity_stage
    from cw_export.quantize import stage as quantize_stage

    check = getattr(build, "check_build_memory", None)
    if check is not None:  # record the build's own up-front estimate beside the measured peak
        from cw_export.models.memory_check import (available_memory_bytes, estimate_build_peak_bytes,
                                                   file_backed_weight_bytes)

        def recorded_check(model, latent_hw, *args, **kwargs):
            quantized = kwargs.get("quantized", False)
            notes["estimated_peak_gib"] = gib(estimate_build_peak_bytes(model, latent_hw, quantized))
            notes["available_gib_at_check"] = gib(available_memory_bytes() or 0)
            notes["mapped_weights_gib"] = gib(file_backed_weight_bytes(model))
            notes["memory_check_skipped"] = skip_memory_check
            if not skip_memory_check:
                check(model, latent_hw, *args, **kwargs)

        build.check_build_memory = recorded_check

    undo = [
        _wrap(timeline, build, "load_model", "load model (architecture models: generated on first use, read back mapped, hash checked)"),
        _wrap(timeline, build, "export_all", "export all graphs"),
        _wrap(timeline, export_stage, "example_inputs", "  example inputs (text encoder + first step)"),
        _wrap(timeline, export_stage, "export_graph", lambda module, inputs, outputs, path, **kw: f"  graph {path.stem}"),
        _wrap(timeline, torch.onnx, "export", "    torch.onnx.export (trace + serialise)"),
        _wrap(timeline, export, "_simplify_in_place", "    onnxsim"),
        _wrap(timeline, export, "gather_external_data", "    gather external data (one tensor at a time)"),
        _wrap(timeline, export, "measure_parity", "    onnxruntime parity run"),
        _wrap(timeline, build, "quantize_bundle", "quantize (INT8 targets)"),
        _wrap(timeline, calibrate_stage, "calibrate_stage", "  calibration trajectories (torch FP32)"),
        _wrap(timeline, quantize_stage, "quantize_stage", "  quantize graphs (+ 8/16-bit sweep)"),
        _wrap(timeline, parity_stage, "parity_stage", "  parity gate (held-out trajectories in onnxruntime)"),
        _wrap(timeline, build, "write_tokenizer_files", "tokenizer files"),
        _wrap(timeline, build, "base_records", "manifest"),
        _wrap(timeline, writer, "list_files", "sha256 of every file"),
    ]
    undo.append(_wrap(timeline, writer, "write_report", "report.html"))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()
        if check is not None:
            build.check_build_memory = check


def gib(n: int) -> float:
    return round(n / 1024**3, 2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the per-stage results")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period in seconds")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="do not let the build's up-front memory estimate refuse the run (the estimate is recorded)")
    args = parser.parse_args(own)

    from cw_export import cli

    timeline = Timeline(args.interval)
    notes: dict = {}
    timeline.start()
    with instrumented(timeline, notes, args.skip_memory_check), timeline.stage("total (cw-export " + " ".join(cli_args) + ")"):
        rc = cli.main(cli_args)
    timeline.stop()
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "command": "python bench/sd15_export.py " + " ".join(argv),
        "exit_code": rc,
        "machine": {"cpus": os.cpu_count(), "ram_gib": gib(psutil.virtual_memory().total),
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()},
        "peak_rss_gib_sampled": gib(timeline.peak_rss),
        "peak_rss_gib_kernel": gib(maxrss_kib * 1024),
        "peak_anonymous_gib_sampled": gib(timeline.peak_anon),
        "build_memory_estimate": notes,
        "stages": [{"stage": e["stage"], "wall_s": round(e.get("wall_s", float("nan")), 2),
                    "peak_rss_gib": gib(e["peak_rss"]), "peak_anonymous_gib": gib(e["peak_anon"]),
                    "rss_before_gib": gib(e["rss_before"]),
                    "rss_after_gib": gib(e.get("rss_after", 0))} for e in timeline.events],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))
    for stage in result["stages"]:
        print(f"{stage['wall_s']:9.1f} s  peak {stage['peak_rss_gib']:6.2f} GiB  anonymous "
              f"{stage['peak_anonymous_gib']:6.2f} GiB  {stage['stage']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
