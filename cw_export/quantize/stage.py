"""The build's quantize stage: every graph the recipe quantizes, through its backend, with the a8 sensitivity sweep
(whole graph, then per block: cw_export.quantize.mixed); the 16-bit versions of 8-bit choices are held for the
parity gate (cw_export.quantize.fallback).

It takes the in-progress bundle folder and the export's graph entries, puts the quantized graphs (and encodings) in
that folder and returns each graph's new entry (``GraphEntry`` with its ``QuantRecord``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..calibrate.collect import CalibrationSet
from ..contract.schema import GraphEntry, QuantRecord
from ..parity.measure import graph_sqnr
from ..runtime.sessions import create_session, manifest_session_config
from . import FP32_REASONS, GraphJob, get_backend, graphs_to_quantize, planned_bits
from .fallback import A16Fallback, hold_a16, hold_a8_donor, move_graph

SWEEP_SAMPLES = 8  # calibration samples the a8 sensitivity sweep measures each candidate on
SWEEP_UNITS = {"block": "block", "layer": "layer", "mac": "MAC group"}  # what the reason calls a sweep group


@dataclass
class QuantizeResult:
    """The quantize stage's output: every graph's new entry, the quantized files inside the bundle, and (with a
    fallback folder) the a16 versions of the graphs that went to 8-bit activations, for ``apply_fallbacks``."""

    entries: dict[str, GraphEntry]
    placed: dict[str, Path]
    fallbacks: dict[str, A16Fallback]


def quantize_stage(recipe, manifest: dict, entries: dict[str, GraphEntry], graphs: dict,
                   calibration: CalibrationSet, bundle: Path, progress: bool,
                   fallback_dir: Path | None = None, plan=None) -> QuantizeResult:
    """Quantize every graph the recipe quantizes (``graphs_to_quantize``) of the bundle whose manifest view is
    ``manifest`` and whose graph entries are ``entries``; the graphs it does not quantize get an FP32 record with
    the reason. With an a8 ``plan`` (cw_export.quantize.plan) a candidate graph starts from the plan's choice
    instead of sweeping; a candidate the plan does not cover is swept as without one."""
    from ..progress import progress_bar

    q = recipe.quantization
    backend = get_backend(q.backend)
    config = manifest_session_config(manifest)
    names = graphs_to_quantize(q, entries)
    depth = sweep_depth(q, backend)
    new_entries: dict[str, GraphEntry] = {}
    placed: dict[str, Path] = {}
    fallbacks: dict[str, A16Fallback] = {}
    with tempfile.TemporaryDirectory(prefix="cw-quantize-") as work:
        work = Path(work)
        fp32 = work / "fp32"
        fp32.mkdir()
        for name in names:  # the FP32 exports move out; the bundle gets the graphs to deploy
            for f in (bundle / "graphs").glob(f"{name}.onnx*"):
                shutil.move(str(f), fp32 / f.name)
        for name in progress_bar(names, enabled=progress, desc="quantize", unit="graph"):
            graph = graphs[name]

            def run(bits: int, a8_tensors: dict | None = None):
                job = GraphJob(name, fp32 / f"{name}.onnx", graph.module, graph.input_names, graph.output_names,
                               calibration.graphs[name], bits, a8_tensors or {})
                folder = "mixed" if a8_tensors else f"a{bits}"
                return backend.quantize_graph(job, q, work / folder / "graphs")

            bits = planned_bits(q, name)
            reason = (f"a{bits}: recipe activation_bits" if name in q.activation_bits
                      else "a16: default for graphs the recipe does not name")
            sweep = None
            result = None
            planned = plan.bits(name) if plan is not None and name in q.a8_candidates else None
            if planned == 16:
                bits, reason = 16, "a16: the a8 plan (--a8-plan) keeps this graph at 16 bits"
                sweep = {"plan": plan.source}
            elif name in q.a8_candidates:
                trial = run(8)
                numbers = _a8_score(trial.file, graph, calibration.graphs[name], config)
                sweep = {"a8_sqnr_db": numbers["sqnr_db"], "a8_guidance_sqnr_db": numbers.get("guidance_sqnr_db"),
                         "threshold_db": q.a8_min_sqnr_db, "guidance_threshold_db": q.a8_min_guidance_sqnr_db,
                         "samples": SWEEP_SAMPLES, "data": "calibration samples"}
                plan_macs = None
                if planned is not None:
                    sweep["plan"] = plan.source
                    plan_macs = plan.macs(name)
                if a8_margin(numbers, q) >= 0:
                    bits, result = 8, trial
                    reason = f"a8: sensitivity sweep {_describe(numbers)} within the recipe's floors"
                    if fallback_dir is not None:
                        fallbacks[name] = hold_a16(run(16), name, fallback_dir)
                else:
                    bits = 16
                    reason = f"a16: 8-bit activations gave {_describe(numbers)}, below the recipe's floors"
                    if planned is not None and not plan_macs:
                        reason += "; the a8 plan (--a8-plan) has no MAC mix for this graph"
                    elif planned is not None or depth != "off":
                        graph_depth = "mac" if planned is not None else depth  # a plan's mix: MAC nodes
                        result = run(16)
                        held = hold_a16(result, name, fallback_dir) if fallback_dir is not None else None
                        mix = (lambda a8_tensors: run(16, a8_tensors)) if getattr(backend, "MIXES", False) else None
                        layers = _layer_sweep(result, trial, graph, calibration.graphs[name], config, q, graph_depth,
                                              mix, plan_macs)
                        sweep["layers"] = layers.as_dict()
                        if layers.a8_groups:
                            bits = "8+16"
                            if held is not None and graph_depth == "mac":  # the gate may keep a prefix of the mix
                                held = held.with_mac_mix(layers.a8_groups, hold_a8_donor(trial, name, fallback_dir))
                            if held is not None:
                                fallbacks[name] = held
                            unit = SWEEP_UNITS[graph_depth]
                            if plan_macs:
                                reason = (f"a8 in {len(layers.a8_groups)} of the a8 plan's {len(plan_macs)} MACs "
                                          f"(--a8-plan, {layers.evaluations} scoring runs), a16 elsewhere: keeps "
                                          f"{_describe(layers.numbers)} (whole graph at a8: {_describe(numbers)})")
                            else:
                                reason = (f"a8 in {len(layers.a8_groups)} of {len(layers.margin_db)} "
                                          f"{unit}s, a16 elsewhere: the per-{unit} sweep keeps "
                                          f"{_describe(layers.numbers)} (whole graph at a8: {_describe(numbers)})"
                                          + (MAC_NEEDS_ORT if graph_depth != q.a8_layer_sweep else ""))
                        elif plan_macs:
                            reason += (f"; no prefix of the a8 plan's {len(plan_macs)} MACs keeps the floors "
                                       f"({layers.evaluations} scoring runs)")
                        elif layers.refused:
                            reason += (f"; the sweep's mix, converted for the NPU, gave "
                                       f"{_describe(layers.refused['converted_mix'])}")
                        else:
                            reason += f"; no {SWEEP_UNITS[graph_depth]} keeps the floors at 8 bits on its own"
            if result is None:
                result = run(bits)
            external = move_graph(result.file, bundle / "graphs", name)
            encodings = None
            if result.encodings is not None:
                (bundle / "encodings").mkdir(exist_ok=True)
                for f in result.encodings.parent.glob(f"{name}.*"):
                    shutil.move(str(f), bundle / "encodings" / f.name)
                encodings = f"encodings/{result.encodings.name}"
            placed[name] = bundle / "graphs" / f"{name}.onnx"
            record = QuantRecord(q.backend, bits, q.weight_bits, encodings, reason, sweep, result.details)
            new_entries[name] = entries[name].with_quantization(f"w{q.weight_bits}a{bits}", record, external)
    for name, entry in entries.items():
        if name not in placed:
            fp32 = QuantRecord(None, reason=FP32_REASONS.get(name, "FP32: not quantized"))
            new_entries[name] = entry.with_quantization(entry.precision, fp32)
    return QuantizeResult({name: new_entries[name] for name in entries}, placed, fallbacks)



def _a8_score(path: Path, graph, data, config: dict) -> dict:
    """SQNR and guidance SQNR of a candidate QDQ graph on the sweep's calibration samples."""
    return graph_sqnr(create_session(path, config=config), graph, data.subset(SWEEP_SAMPLES))


def a8_margin(numbers: dict, q) -> float:
    """dB above the recipe's a8 floors (negative: below one of them); the cond - uncond SQNR is checked because
    classifier-free guidance multiplies that difference (a 30 dB graph still broke the guidance gate when its
    cond - uncond difference was noisy)."""
    margin = numbers["sqnr_db"] - q.a8_min_sqnr_db
    if q.a8_min_guidance_sqnr_db > 0 and "guidance_sqnr_db" in numbers:
        margin = min(margin, numbers["guidance_sqnr_db"] - q.a8_min_guidance_sqnr_db)
    return margin


def _describe(numbers: dict) -> str:
    text = f"SQNR {numbers['sqnr_db']:.2f} dB"
    if "guidance_sqnr_db" in numbers:
        text += f", cond-uncond SQNR {numbers['guidance_sqnr_db']:.2f} dB"
    return text


MAC_NEEDS_ORT = "; per block, not per MAC: the MAC sweep's 8/16-bit conversions have no AIMET encodings form"


def sweep_depth(q, backend) -> str:
    """The recipe's sweep granularity, except that a MAC sweep runs per block on a backend that does not build
    mixed graphs itself (aimet: its encodings have no form for the conversions; the reason says so)."""
    if q.a8_layer_sweep == "mac" and not getattr(backend, "MIXES", False):
        return "block"
    return q.a8_layer_sweep


def _layer_sweep(a16, a8, graph, data, config: dict, q, depth: str, mix=None, plan_macs: list[str] | None = None):
    """Per-layer mixed precision (cw_export.quantize.mixed); rewrites ``a16`` in place into the mixed graph (and
    its encodings) when some layers can go to 8 bits.

    The block and layer sweeps score candidates by merging the 8-bit graph's quantization parameters into the
    16-bit one (no new calibration per candidate; the mac sweep's candidates are already in the NPU's form,
    ``mixed.convert_macs``). Such a merged graph is right on the CPU EP but not a valid NPU graph: an op whose
    input and output differ in bit width needs a conversion between them (measured: the QNN HTP refuses the merged
    low_res and adaptor of the built-in model). ``mix(a8_tensors)``, where the backend offers it (ort: onnxruntime's
    mixed-precision overrides add the conversions), quantizes the chosen mix anew with the same 8-bit parameters;
    that graph is scored again and ships only if it still keeps the floors. ``plan_macs`` (an a8 plan's MAC
    list, depth "mac") replaces the sweep by the longest prefix of that list that keeps the floors."""
    import json

    from .mixed import a8_parameters, merge_encodings, replay, sweep

    def score(path: Path) -> tuple[float, dict]:
        numbers = _a8_score(path, graph, data, config)
        return a8_margin(numbers, q), numbers

    if plan_macs:
        layers, mixed_file = replay(a16.file, a8.file, score, plan_macs)
    else:
        layers, mixed_file = sweep(a16.file, a8.file, score, depth=depth, order_by=q.a8_mac_order)
    if mixed_file is not None and mix is not None and depth != "mac":  # mac: converted as scored
        mixed = mix(a8_parameters(a8.file, layers.a8_tensors))
        margin, numbers = score(mixed.file)
        mixed_file.unlink()
        if margin < 0:  # the converted graph misses what the merged one kept: no 8-bit layers
            layers.refused = {"converted_mix": numbers}
            layers.a8_groups, layers.a8_tensors = [], []
            return layers
        layers.numbers = numbers
        mixed_file = mixed.file
        a16.details = mixed.details
    if mixed_file is not None:
        mixed_file.replace(a16.file)
        if a16.encodings is not None and a8.encodings is not None:
            base = json.loads(a16.encodings.read_text(encoding="utf-8"))
            donor = json.loads(a8.encodings.read_text(encoding="utf-8"))
            merged = merge_encodings(base, donor, layers.a8_tensors)
            a16.encodings.write_text(json.dumps(merged, indent=1), encoding="utf-8")
    return layers
