"""Fallbacks of the quantized build, decided by the parity gate: graphs held in their FP32 or 16-bit-activation form
while the gate measures, and put back in the bundle when it asks (cw_export.parity.stage.gated_parity_stage)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..contract.schema import GraphEntry, QuantRecord
from . import IMAGE_GRAPHS, graphs_to_quantize

def move_graph(src: Path, dst_dir: Path, name: str) -> bool:
    """Move ``src`` (+ its external data files) to ``dst_dir/<name>.onnx``, replacing the FP32 file(s).
    Returns whether the graph uses external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    for stale in dst_dir.glob(f"{name}.onnx*"):
        stale.unlink()
    model = onnx.load(str(src), load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:  # rewrite into one .data file beside the graph
        model = onnx.load(str(src), load_external_data=True)
        onnx.save_model(model, str(dst_dir / f"{name}.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.onnx.data", size_threshold=1024)
    else:
        shutil.move(str(src), dst_dir / f"{name}.onnx")
    return external


@dataclass
class A16Fallback:
    """The 16-bit-activation version of a graph the sweep put at 8 bits, held until the parity gate has spoken."""

    file: Path
    encodings: list[Path]
    details: dict
    macs: list[str] = field(default_factory=list)  # MAC sweep: its 8-bit MACs, in the sweep's order
    donor: Path | None = None  # MAC sweep: the 8-bit QDQ graph whose scales the conversions take

    def with_mac_mix(self, macs: list[str], donor: Path) -> "A16Fallback":
        """This fallback, able to back the MAC mix ``macs`` (``donor``: the held 8-bit graph) off to a prefix."""
        return replace(self, macs=list(macs), donor=donor)


def _hold_graph(graph_dir: Path, name: str, folder: Path) -> Path:
    """Copy graph ``name`` (``<name>.onnx`` + its external data) from ``graph_dir`` into ``folder``, where it waits
    for the parity gate's verdict; returns the held ``.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in graph_dir.glob(f"{name}.onnx*"):
        shutil.copy2(f, folder / f.name)
    return folder / f"{name}.onnx"


def hold_a16(result, name: str, fallback_dir: Path) -> A16Fallback:
    """Copy an a16 result (graph + external data + encodings) out of the quantizer's scratch folder."""
    folder = fallback_dir / name
    file = _hold_graph(result.file.parent, name, folder)
    encodings = []
    if result.encodings is not None:
        for f in result.encodings.parent.glob(f"{name}.*"):
            encodings.append(Path(shutil.copy2(f, folder / f"encodings-{f.name}")))
    return A16Fallback(file, encodings, dict(result.details))


def hold_a8_donor(result, name: str, fallback_dir: Path) -> Path:
    """Copy the 8-bit graph a MAC mix converts from, so the parity gate can rebuild a shorter mix."""
    return _hold_graph(result.file.parent, name, fallback_dir / f"{name}-a8")


def back_off_mac_mix(entries: dict[str, GraphEntry], bundle: Path, name: str, held: A16Fallback, keep: int,
                     failures: list[str]) -> dict[str, GraphEntry]:
    """Put graph ``name`` in the bundle with only the first ``keep`` MACs of its sweep's mix at 8 bits (the sweep
    ordered them by MACs per share of the noise budget, so a prefix keeps the most MACs for its noise); returns its
    new entry. ``keep`` >= 1; 0 is ``apply_fallbacks``."""
    import onnx

    from ..onnx_index import load_with_small_tensors
    from .mixed import convert_macs

    base = load_with_small_tensors(held.file)  # external weights stay where they are
    donor = load_with_small_tensors(held.donor)  # scales and biases are copied from it: inline
    shorter = held.file.with_name(f"{name}.backoff.onnx")  # beside the a16 file: its external data resolves
    onnx.save_model(convert_macs(base, donor, held.macs[:keep]), str(shorter))
    external = move_graph(shorter, bundle / "graphs", name)
    entry = entries[name]
    quant = entry.quantization
    first = quant.gate_fallback or {"precision": entry.precision, "reason": quant.reason,
                                    "macs": len(held.macs)}
    first = {**first, "gate_failures": list(failures), "kept_macs": keep}
    sweep = dict(quant.sweep or {})
    if "layers" in sweep:
        sweep["layers"] = {**sweep["layers"], "a8_groups": held.macs[:keep]}
    record = replace(quant, sweep=sweep, gate_fallback=first,
                     reason=f"a8 in {keep} of the sweep's {len(held.macs)} 8-bit MACs, a16 elsewhere: the full mix "
                            f"failed the bundle's parity gate ({'; '.join(failures)}), the gate kept the longest "
                            f"prefix of the sweep's order that passes")
    return {name: entry.with_quantization(entry.precision, record, external)}


def apply_fallbacks(entries: dict[str, GraphEntry], bundle: Path, fallbacks: dict[str, A16Fallback],
                    failures: list[str]) -> dict[str, GraphEntry]:
    """Put the held a16 graphs in place of their 8-bit versions after those failed the bundle's parity gate
    (the sweep's floors are measured per graph on calibration inputs; the gate on whole held-out trajectories);
    returns their new entries."""
    changed = {}
    for name, held in fallbacks.items():
        external = move_graph(held.file, bundle / "graphs", name)
        for stale in (bundle / "encodings").glob(f"{name}.*") if held.encodings else ():
            stale.unlink()
        for f in held.encodings:
            shutil.move(str(f), bundle / "encodings" / f.name.removeprefix("encodings-"))
        entry = entries[name]
        quant = entry.quantization
        first = {"precision": entry.precision, "reason": quant.reason, "gate_failures": list(failures)}
        record = replace(quant, activation_bits=16, details=held.details, gate_fallback=first,
                         reason=f"a16: the sweep's 8-bit choice ({first['precision']}) failed the bundle's parity "
                                f"gate ({'; '.join(failures)}), so this graph fell back to 16-bit activations")
        changed[name] = entry.with_quantization(f"w{quant.weight_bits}a16", record, external)
    return changed


def hold_fp32(recipe, graphs, bundle: Path, fallback_dir: Path) -> dict[str, Path]:
    """Copies of the FP32 exports of the once-per-image graphs (of ``graphs``: the bundle's graph names) this
    recipe quantizes, held until parity is measured (call before ``quantize_stage`` replaces them):
    ``keep_fp32_where_parity_requires`` may put them back."""
    held = {}
    for name in graphs_to_quantize(recipe.quantization, graphs):
        if name in IMAGE_GRAPHS:
            held[name] = _hold_graph(bundle / "graphs", name, fallback_dir / "fp32" / name)
    return held


def keep_fp32_where_parity_requires(entries: dict[str, GraphEntry], bundle: Path, held: dict[str, Path],
                                    placed: dict[str, Path], measured_graphs: dict,
                                    floor: float) -> dict[str, GraphEntry]:
    """Put back the FP32 export of every held once-per-image graph whose held-out SQNR (``measured_graphs``: the
    parity record's per-graph numbers) is below the recipe's graph floor, instead of failing the build: it runs
    once per image, so FP32 costs little time, while a noisy text embedding or image costs parity. Its quantization
    record keeps the reason and the measured numbers; it leaves ``placed`` (parity must be measured again).
    Returns the new entries of the graphs put back."""
    reverted = {}
    for name, fp32_file in held.items():
        measured = measured_graphs.get(name)
        if measured is None or floor <= 0 or measured["sqnr_db"] >= floor:
            continue
        entry = entries[name]
        tried = entry.quantization
        external = move_graph(fp32_file, bundle / "graphs", name)
        for stale in (bundle / "encodings").glob(f"{name}.*") if tried.encodings else ():
            stale.unlink()
        if (bundle / "encodings").is_dir() and not any((bundle / "encodings").iterdir()):
            (bundle / "encodings").rmdir()
        record = QuantRecord(
            None,
            reason=f"FP32: kept where parity requires: {entry.precision} ({tried.backend}) measured "
                   f"{measured['sqnr_db']:.2f} dB SQNR vs FP32 on held-out inputs, below the recipe's graph floor "
                   f"{floor:g} dB",
            parity_fallback={"precision": entry.precision, "backend": tried.backend,
                             "activation_bits": tried.activation_bits, "sqnr_db": measured["sqnr_db"],
                             "outputs": measured["outputs"], "graph_min_sqnr_db": floor})
        reverted[name] = entry.with_quantization("fp32", record, external)
        placed.pop(name, None)
    return reverted
