"""Where the QNN HTP's numbers leave the CPU EP's inside one quantized graph of a bundle.

The CPU EP runs a QDQ graph as DequantizeLinear -> float op -> QuantizeLinear; the HTP runs the same node units in
fixed point. Both should land on the same quantization grid, so HTP vs CPU SQNR at a tensor measures what the HTP
adds (docs/quantization.md: the CPU gate's guidance ratio misses the HTP's by up to 0.05). This script exposes every
quantized activation (a second DequantizeLinear on each activation QuantizeLinear's output, as an extra graph output:
the graph's own node units are untouched, so the HTP compiles the same graph), runs it on N of the gate's inputs on
both EPs and prints, per tensor in graph order, HTP vs CPU SQNR and how much the node that wrote it lost against its
quantized inputs (its local drop): the node types the HTP computes differently.

    python bench/htp_gap.py BUNDLE --graph low_res [--sample 4] [--json OUT] [--top 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cw_export.onnx_index import producers  # noqa: E402

TAP_SUFFIX = "__htp_gap_tap"


def tapped(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` with an extra output per quantized activation; returns it and tap name -> the QuantizeLinear's
    float input (the tensor the tap shows, as the CPU EP's rounding places it)."""
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    taps = {}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in weights or node.output[0] in outputs:
            continue
        tap = node.output[0] + TAP_SUFFIX
        graph.node.append(helper.make_node("DequantizeLinear", [node.output[0], *node.input[1:]], [tap],
                                           name=tap, **{a.name: helper.get_attribute_value(a)
                                                        for a in node.attribute if a.name == "axis"}))
        graph.output.append(helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
        taps[tap] = node.input[0]
    return model, taps


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(np.sum((x.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return 200.0 if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--graph", required=True)
    parser.add_argument("--sample", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from cw_export.calibrate.stage import tokenizer_fn
    from cw_export.models.pipeline import load_model
    from cw_export.runtime.sessions import create_session, manifest_session_config
    from cw_export.validate.parity import reference_graphs, source_model_spec
    from cw_export.validate.sampled import gate_inputs

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    model = load_model(source_model_spec(manifest))
    recorded = manifest["parity"]
    samples = gate_inputs(manifest, reference_graphs(manifest, model), tokenizer_fn(model), recorded["prompts"],
                          recorded["seeds"][0], [args.graph], args.sample)[args.graph]
    onnx_model, taps = tapped(onnx.load(str(args.bundle / manifest["graphs"][args.graph]["file"])))
    writer = producers(onnx_model.graph)
    names = list(taps)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="htp_gap-") as work:  # never beside (or inside) the user's bundle
        tmp = Path(work) / f"{args.graph}_tapped.onnx"
        onnx.save(onnx_model, str(tmp))
        for provider in ("cpu", "qnn-htp"):
            # the manifest's settings (basic): at onnxruntime's "extended"/"all" levels the CPU EP fuses QDQ
            # MAC units into u8s8 QLinear kernels whose int16 pair sums saturate on x86 without VNNI (measured on a
            # hand-made 8-bit MatMul: 18 dB vs the exact 35 dB), and the comparison would measure that instead
            session = create_session(tmp, provider, config=manifest_session_config(manifest), precision="int8",
                                     threads=2)
            runs[provider] = [dict(zip(names, session.run(names, s.feeds))) for s in samples]
            del session
    # pooled over samples, per tap
    snr = {}
    for tap in names:
        ref = np.concatenate([r[tap].ravel() for r in runs["cpu"]])
        got = np.concatenate([r[tap].ravel() for r in runs["qnn-htp"]])
        snr[tap] = sqnr_db(ref, got)
    by_tensor = {taps[t]: snr[t] for t in names}
    rows = []
    for tap in names:
        tensor = taps[tap]
        node = writer.get(tensor)
        if node is None:
            continue
        inputs = []  # quantized activation inputs of the node: DQ outputs whose Q input we tapped
        if node.op_type == "DequantizeLinear":  # a 16 -> 8-bit conversion (Q16 -> DQ -> Q8): its input is the Q16's
            q = writer.get(node.input[0])
            if q is not None and q.input[0] in by_tensor:
                inputs.append(by_tensor[q.input[0]])
        for name in node.input:
            dq = writer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear":
                q = writer.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in by_tensor:
                    inputs.append(by_tensor[q.input[0]])
        worst_in = min(inputs) if inputs else 200.0
        rows.append({"tensor": tensor, "op": node.op_type, "node": node.name, "htp_vs_cpu_db": round(snr[tap], 2),
                     "worst_input_db": round(worst_in, 2), "local_drop_db": round(worst_in - snr[tap], 2)})
    print(f"{args.graph}: {len(rows)} quantized activations, {len(samples)} samples; HTP vs CPU EP")
    print(f"{'op':<18} {'htp_vs_cpu':>10} {'inputs':>8} {'drop':>7}  node")
    for row in sorted(rows, key=lambda r: -r["local_drop_db"])[:args.top]:
        print(f"{row['op']:<18} {row['htp_vs_cpu_db']:>10.2f} {row['worst_input_db']:>8.2f} "
              f"{row['local_drop_db']:>7.2f}  {row['node']}")
    by_op: dict[str, list[float]] = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row["local_drop_db"])
    print("local drop by op type (median, max, count):")
    for op, drops in sorted(by_op.items(), key=lambda kv: -max(kv[1])):
        print(f"  {op:<18} {np.median(drops):7.2f} {max(drops):7.2f} {len(drops):4d}")
    if args.json:
        args.json.write_text(json.dumps({"graph": args.graph, "samples": len(samples), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
