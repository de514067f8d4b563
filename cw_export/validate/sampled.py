"""``cw-export validate BUNDLE --provider qnn-htp --sample N``: every quantized graph run on the provider on N of the
inputs the bundle's parity gate measured it on, and compared there with the CPU EP and the FP32 torch graph.

The full mode runs the gate's whole trajectory on the provider (hours on the emulated HTP for a 512x512 model); this
one runs N graph calls per graph:
  1. the gate's inputs, regenerated: the FP32 torch trajectories of the recorded held-out prompts and seeds, which is
     what ``parity.measure`` feeds every graph (text encoder: the prompts' token ids; VAE decoder: the FP32 final
     latents). They are deterministic (torch on the CPU, seeded noise). N (prompt, step) pairs are kept per graph
     (``spread_pairs``: spread over the steps where the graph runs, then over prompts); with fewer pairs than N,
     all of them.
  2. on those inputs: the FP32 outputs (from the trajectory) and the CPU EP's (the bundle's graph)
  3. the provider's outputs, each graph in its own process, ``workers`` at a time (``provider_worker``)
  4. per graph: SQNR vs FP32 pooled over the samples (the gate's definition, checked against the gate's
     ``graph_min_sqnr_db``), worst and median per sample; vs the CPU EP, worst and median.
Nothing else is measured on the provider in this mode, and nothing is extrapolated: per-step latent PSNR, guidance
ratio, final latent and image parity need the full mode.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..calibrate.collect import graph_feeds, graph_outputs, graph_steps, unit_noise
from ..errors import InputError
from ..parity.measure import PooledSqnr, sqnr_db
from .check import Check

# Peak RSS of one worker process, estimated from its graph's file size (ONNX + external data): measured on the
# built-in main job's graphs on the emulated HTP (docs/qnn_htp.md "Sampled check"), rounded up with margin.
# (227-235 MB for the 0.1-0.5 MB graphs, 279 MB for the 1.9 MB low_res: ~27 bytes per graph byte above the base).
# Not measured on large graphs: on a 512x512 SD 1.5 bundle this estimate is an assumption (--workers overrides it).
WORKER_BASE_BYTES = 384 << 20
WORKER_BYTES_PER_GRAPH_BYTE = 32
NOT_MEASURED = ("per-step latent PSNR", "guidance ratio", "final latent PSNR", "image parity")


@dataclass
class Sample:
    """One recorded input of a graph: where in the gate it came from, the feeds, and the FP32 outputs there."""

    prompt: int
    step: int | None  # 0-based step of the trajectory; None for the text encoder and the VAE decoder
    kind: str | None
    feeds: dict[str, np.ndarray]
    fp32: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        where = f"prompt {self.prompt}"
        return where if self.step is None else f"{where} step {self.step + 1} ({self.kind})"


@dataclass
class GraphRun:
    """What one graph's worker reported."""

    session_s: float | None = None
    seconds: dict[int, float] = field(default_factory=dict)
    peak_rss: int | None = None
    done: bool = False
    error: str | None = None


def spread_pairs(num_prompts: int, steps: list[int], n: int) -> set[tuple[int, int]]:
    """``n`` (prompt, step) pairs of ``steps`` x prompts: every step an equal share, the remainder on steps spread
    evenly from the first to the last (4 of 8 steps: 0, 2, 4, 7, so that with clock 2 a graph of every step is
    seen on full and clocked steps), and the prompts spread within a step and rotated from one kept step to the
    next (4 of 8 steps, 4 prompts: prompts 0, 1, 2, 3); all pairs when there are no more than ``n``."""
    if n >= num_prompts * len(steps):
        return {(p, s) for p in range(num_prompts) for s in steps}
    base, extra = divmod(n, len(steps))
    last = len(steps) - 1
    bonus = {0} if extra == 1 else {i * last // (extra - 1) for i in range(extra)}
    keep, kept_steps = set(), 0
    for j, step in enumerate(steps):
        quota = base + (1 if j in bonus else 0)
        if quota == 0:
            continue
        keep.update(((k * num_prompts // quota + kept_steps) % num_prompts, step) for k in range(quota))
        kept_steps += 1
    return keep


def gate_inputs(manifest: dict, fp32_graphs: dict, tokenize, prompts: list[str], seed: int, graphs: list[str],
                n: int, progress: bool = False) -> dict[str, list[Sample]]:
    """N of the inputs ``parity.measure`` fed each of ``graphs``, regenerated from the FP32 torch trajectories."""
    from ..progress import progress_bar
    from ..runtime.pipeline import BundleRunner

    wiring = manifest["wiring"]
    text, decode = wiring["text"], wiring["decode"]
    schedule = manifest["schedule"]
    in_loop = graph_steps(manifest, schedule["steps"], schedule["clock"])
    keep = {g: spread_pairs(len(prompts), in_loop[g], n) for g in graphs if g in in_loop}
    per_prompt = {p for p, _ in spread_pairs(len(prompts), [0], n)}
    runner = BundleRunner.from_sessions(manifest, fp32_graphs)
    samples: dict[str, list[Sample]] = {g: [] for g in graphs}

    def fp32_sample(graph: str, k: int, feeds: dict) -> Sample:
        reference = fp32_graphs[graph]
        return Sample(k, None, None, feeds, dict(zip(reference.output_names, reference.run(None, feeds))))

    for k, prompt in enumerate(progress_bar(prompts, enabled=progress, desc="FP32 trajectories", unit="prompt")):
        ids = tokenize(prompt)
        if text["graph"] in samples and k in per_prompt:
            samples[text["graph"]].append(fp32_sample(text["graph"], k, dict(ids)))
        decoded = decode["graph"] in samples and k in per_prompt
        if not decoded and not any(p == k for pairs in keep.values() for p, _ in pairs):
            continue
        hidden, pooled_text = runner.encode_ids(ids)

        def on_step(i: int, kind: str, slots: dict) -> None:
            for graph in wiring["steps"][kind]:
                if (k, i) in keep.get(graph, ()):
                    feeds = {name: np.array(v) for name, v in graph_feeds(manifest, graph, slots).items()}
                    outputs = {name: np.array(v) for name, v in graph_outputs(manifest, graph, slots).items()}
                    samples[graph].append(Sample(k, i, kind, feeds, outputs))

        ref = runner.generate(hidden, pooled_text, unit_noise(manifest["latent"]["shape"], seed + k), on_step=on_step)
        if decoded:
            samples[decode["graph"]].append(fp32_sample(decode["graph"], k, {decode["input"]: ref.latents.astype(np.float32)}))
    return samples


def graph_bytes(bundle: Path, manifest: dict, graph: str) -> int:
    """The graph's ONNX file and its external data (the manifest lists every file with its size)."""
    stem = Path(manifest["graphs"][graph]["file"]).stem
    files = manifest.get("files", {})
    return sum(int(entry.get("size", 0)) for rel, entry in files.items()
               if isinstance(entry, dict) and Path(rel).parent.name == "graphs" and Path(rel).name.startswith(stem))


def default_workers(bundle: Path, manifest: dict, graphs: list[str]) -> int:
    """As many worker processes as cores and available memory allow (``WORKER_*`` estimate per graph), at most one
    per graph, at least one."""
    from ..models.memory_check import available_memory_bytes

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available = available_memory_bytes()
    workers = min(cores, len(graphs))
    if available is not None:
        need = sorted((WORKER_BASE_BYTES + WORKER_BYTES_PER_GRAPH_BYTE * graph_bytes(bundle, manifest, g)
                       for g in graphs), reverse=True)
        fit = 0
        while fit < workers and sum(need[:fit + 1]) <= available:
            fit += 1
        workers = fit
    return max(1, workers)


def run_workers(bundle: Path, inputs: dict[str, Path], counts: dict[str, int], provider: str, workers: int,
                progress: bool = True) -> dict[str, GraphRun]:
    """Run each graph of ``inputs`` (largest input file first) in its own process, ``workers`` at a time; a
    progress bar (samples done, the running graphs, ETA) on a terminal."""
    import multiprocessing

    from ..progress import progress_bar
    from .provider_worker import run_graph

    context = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads
    events = context.Queue()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    pending = sorted(inputs, key=lambda g: -inputs[g].stat().st_size)
    running: dict[str, object] = {}
    runs = {g: GraphRun() for g in inputs}
    bar = progress_bar(total=sum(counts.values()), desc=f"{provider} samples", unit="run", enabled=progress)

    def handle(event: tuple) -> None:
        kind, graph = event[0], event[1]
        run = runs[graph]
        if kind == "ready":
            run.session_s = event[2]
        elif kind == "sample":
            run.seconds[event[2]] = event[3]
            bar.update(1)
        elif kind == "done":
            run.peak_rss, run.done = event[2], True
        elif kind == "error":
            run.error = event[2]
            bar.update(counts[graph] - len(run.seconds))

    try:
        while pending or running:
            while pending and len(running) < workers:
                graph = pending.pop(0)
                process = context.Process(target=run_graph, args=(str(bundle), graph, str(inputs[graph]), provider,
                                                                  threads, events), daemon=True)
                process.start()
                running[graph] = process
                bar.set_postfix_str(", ".join(running))
            try:
                handle(events.get(timeout=0.5))
            except queue.Empty:
                pass
            for graph, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                while True:  # its last events may still be in the pipe
                    try:
                        handle(events.get(timeout=0.2))
                    except queue.Empty:
                        break
                run = runs[graph]
                if run.error is None and not run.done:
                    run.error = (f"worker process exited with code {process.exitcode} after "
                                 f"{len(run.seconds)} of {counts[graph]} samples on {provider} (a negative code is "
                                 "the signal that ended it: -11 a segmentation fault, -9 e.g. the out-of-memory "
                                 "killer)")
                    bar.update(counts[graph] - len(run.seconds))
                del running[graph]
                bar.set_postfix_str(", ".join(running))
    finally:
        for process in running.values():
            process.terminate()
            process.join()
        bar.close()
    return runs


def _write_inputs(folder: Path, graph: str, samples: list[Sample]) -> Path:
    from .provider_worker import input_key

    path = folder / f"{graph}.in.npz"
    np.savez(path, **{input_key(j, name): value for j, s in enumerate(samples) for name, value in s.feeds.items()})
    return path


def _worst(values: list[float]) -> float:
    return min(values) if values else float("nan")


def graph_result(graph: str, samples: list[Sample], provider_out: list[dict], cpu_out: list[dict], run: GraphRun,
                 recorded: dict, minimum: float) -> dict:
    """Per-sample and aggregate SQNRs of one graph (provider vs FP32, provider vs CPU EP, CPU EP vs FP32)."""
    on_provider, on_cpu = PooledSqnr(), PooledSqnr()
    rows = []
    for j, (sample, ours, cpu) in enumerate(zip(samples, provider_out, cpu_out)):
        on_provider.add(sample.fp32, ours)
        on_cpu.add(sample.fp32, cpu)
        rows.append({"label": sample.label, "prompt": sample.prompt, "step": sample.step, "kind": sample.kind,
                     "sqnr_vs_fp32_db": min(sqnr_db(sample.fp32[o], ours[o]) for o in sample.fp32),
                     "sqnr_vs_cpu_db": min(sqnr_db(cpu[o], ours[o]) for o in sample.fp32),
                     "cpu_vs_fp32_db": min(sqnr_db(sample.fp32[o], cpu[o]) for o in sample.fp32),
                     "seconds": round(run.seconds.get(j, float("nan")), 3)})
    vs_fp32 = [r["sqnr_vs_fp32_db"] for r in rows]
    vs_cpu = [r["sqnr_vs_cpu_db"] for r in rows]
    pooled = on_provider.result()
    return {
        "samples": rows,
        "sqnr_vs_fp32_db": {"pooled": pooled["sqnr_db"], "outputs": pooled["outputs"], "worst": _worst(vs_fp32),
                            "median": statistics.median(vs_fp32)},
        "sqnr_vs_cpu_db": {"worst": _worst(vs_cpu), "median": statistics.median(vs_cpu)},
        "cpu_vs_fp32_db": {"pooled": on_cpu.result()["sqnr_db"]},
        "recorded_cpu_sqnr_db": recorded["sqnr_db"], "recorded_samples": recorded.get("samples"),
        "min_sqnr_db": minimum, "passed": pooled["sqnr_db"] >= minimum,
        "session_s": None if run.session_s is None else round(run.session_s, 3),
        "peak_rss_bytes": run.peak_rss,
    }


def _graph_check(graph: str, provider: str, result: dict, n: int) -> Check:
    fp32, cpu = result["sqnr_vs_fp32_db"], result["sqnr_vs_cpu_db"]
    rows = result["samples"]
    worst = min(rows, key=lambda r: r["sqnr_vs_fp32_db"])
    where = ", ".join(r["label"] for r in rows)
    timing = f"session {result['session_s']:.1f} s, {statistics.median(r['seconds'] for r in rows):.2f} s/sample"
    numbers = (f"vs FP32 torch {fp32['pooled']:.2f} dB pooled (worst {fp32['worst']:.2f}, median {fp32['median']:.2f}); "
               f"vs CPU EP worst {cpu['worst']:.2f}, median {cpu['median']:.2f} dB; CPU EP vs FP32 on these samples "
               f"{result['cpu_vs_fp32_db']['pooled']:.2f} dB (gate recorded {result['recorded_cpu_sqnr_db']:.2f} dB "
               f"over {result['recorded_samples']} samples); {timing}; samples: {where}")
    if result["passed"]:
        return Check(f"{graph} on {provider} ({len(rows)} samples)", True, f"{numbers}; min {result['min_sqnr_db']:g} dB")
    also = ""
    if result["cpu_vs_fp32_db"]["pooled"] < result["min_sqnr_db"]:  # measured: N=2 on the built-in model's low_res
        also = (f"; the CPU EP is below it on these samples too ({result['cpu_vs_fp32_db']['pooled']:.2f} dB, "
                f"gate recorded {result['recorded_cpu_sqnr_db']:.2f} dB over all its {result['recorded_samples']} "
                f"samples), not only the {provider}: these samples are harder than the gate's pool (a larger "
                "--sample pools closer to it) or the graph changed since the gate (validate --provider cpu "
                "re-measures the record)")
    return Check(f"{graph} on {provider} ({len(rows)} samples)", False,
                 f"SQNR vs FP32 torch {fp32['pooled']:.2f} dB pooled over {len(rows)} samples < the gate's "
                 f"{result['min_sqnr_db']:g} dB (worst sample {worst['label']}: {worst['sqnr_vs_fp32_db']:.2f} dB)"
                 f"{also}; {numbers}")


def selected_graphs(quantized: list[str], only: tuple[str, ...]) -> list[str]:
    """``quantized`` restricted to ``only`` (all when empty); a name the bundle does not quantize is one line."""
    unknown = sorted(set(only) - set(quantized))
    if unknown:
        raise InputError(f"--graph {', '.join(unknown)}: not a quantized graph of this bundle; "
                         f"its quantized graphs: {', '.join(quantized)}")
    return [g for g in quantized if not only or g in only]


def write_json(path: Path, report: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sampled_parity_checks(bundle: Path, manifest: dict, model, fp32_graphs: dict, provider: str, n: int,
                          workers: int | None = None, json_out: Path | None = None,
                          progress: bool = True, only: tuple[str, ...] = ()) -> list[Check]:
    """The sampled check of every quantized graph on ``provider`` against ``fp32_graphs`` (the FP32 torch graphs,
    ``validate.parity.reference_graphs``; module docstring); one Check per graph and one summary, which names what
    this mode does not measure. ``only``: just these graphs (``--graph``; on a 512x512 model one graph on the
    emulated HTP is an hour, so a user re-checks the one that failed)."""
    from ..calibrate.stage import tokenizer_fn
    from ..runtime.sessions import bundle_session

    started = time.perf_counter()
    recorded = manifest["parity"]
    graphs = selected_graphs(sorted(recorded["graphs"]), only)
    minimum = recorded["thresholds"].get("graph_min_sqnr_db", 0)
    samples = gate_inputs(manifest, fp32_graphs, tokenizer_fn(model), recorded["prompts"], recorded["seeds"][0],
                          graphs, n, progress)
    cpu_out = {}
    for graph in graphs:  # the CPU EP on the same inputs (seconds, beside the provider's minutes)
        session = bundle_session(bundle, manifest, graph, "cpu")
        names = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
        cpu_out[graph] = [dict(zip(names, session.run(names, s.feeds))) for s in samples[graph]]
        del session
    workers = workers or default_workers(bundle, manifest, graphs)
    prepared = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cw-sampled-") as tmp:
        folder = Path(tmp)
        inputs = {g: _write_inputs(folder, g, samples[g]) for g in graphs}
        runs = run_workers(bundle, inputs, {g: len(samples[g]) for g in graphs}, provider, workers, progress)
        from .provider_worker import output_path

        results, checks = {}, []
        for graph in graphs:
            run = runs[graph]
            if run.error is not None:
                results[graph] = {"error": run.error, "passed": False, "min_sqnr_db": minimum}
                checks.append(Check(f"{graph} on {provider}", False, run.error))
                continue
            outputs = []
            for j in range(len(samples[graph])):
                with np.load(output_path(folder, graph, j)) as data:
                    outputs.append({name: data[name] for name in data.files})
            results[graph] = graph_result(graph, samples[graph], outputs, cpu_out[graph], run,
                                          recorded["graphs"][graph], minimum)
            checks.append(_graph_check(graph, provider, results[graph], n))
    wall = time.perf_counter() - started
    failed = [g for g in graphs if not results[g]["passed"]]
    counts = sorted({len(samples[g]) for g in graphs})
    per_graph = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    scope = "" if not only else f" (--graph: {len(recorded['graphs']) - len(graphs)} other graph(s) not checked)"
    detail = (f"{len(graphs)} graphs{scope} x {per_graph} samples of the gate's inputs (--sample {n}; held-out prompts "
              f"{len(recorded['prompts'])}, seeds from {recorded['seeds'][0]}), {workers} worker(s), {wall:.0f} s "
              f"({prepared - started:.0f} s FP32 trajectories and CPU EP); not measured on {provider} in this mode: "
              f"{', '.join(NOT_MEASURED)} (validate without --sample)")
    if failed:
        detail = f"{len(failed)} graph(s) fail on {provider}: {', '.join(failed)}; {detail}"
    checks.append(Check(f"sampled {provider} check", not failed, detail))
    if json_out is not None:
        write_json(json_out, {
            "provider": provider, "sample": n, "workers": workers, "wall_s": round(wall, 1),
            "prepare_s": round(prepared - started, 1), "prompts": recorded["prompts"],
            "seeds": [recorded["seeds"][0] + k for k in range(len(recorded["prompts"]))],
            "graphs": results, "passed": not failed, "only": list(only), "not_measured": list(NOT_MEASURED),
            "definition": "SQNR = 10*log10(sum ref^2 / sum (x - ref)^2) in dB, worst output of the graph; pooled: "
                          "signal and noise summed over the samples (the parity gate's definition); worst / median: "
                          "over the per-sample values; steps are 1-based in labels, 0-based in 'step'",
        })
    return checks
