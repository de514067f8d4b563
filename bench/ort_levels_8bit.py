"""Why parity and the runtime run quantized graphs under onnxruntime's ``basic`` level: one 8-bit MAC node unit
(uint8 activations, per-channel int8 weights, uint8 output, as the snapdragon-int8 sweep writes them) on the CPU EP at
each optimisation level and on the QNN HTP, against exact integer arithmetic.

At ``extended``/``all`` the CPU EP fuses the DQ -> MatMul/Conv -> Q unit into a u8s8 QLinear kernel; on x86 without
AVX-VNNI its int16 pair sums saturate (255 * 127 * 2 > 32767), so the CPU EP then measures its own kernel's error,
not the quantization's. ``basic`` leaves the unit as DQ -> float op -> Q.

    python bench/ort_levels_8bit.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cw_export.runtime.sessions import OPTIMIZATION_LEVELS, create_session, session_options  # noqa: E402

X_SCALE, X_ZERO = 0.02137229, 139  # the built-in low_res graph's 8-bit encoder_hidden_states encoding
K, N, T = 64, 48, 77


def mac_unit(kind: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A QDQ MatMul ([T, K] x [K, N]) or 1x1 Conv unit, its input and the exact result before output rounding."""
    weight = rng.standard_normal((K, N)).astype(np.float32) * 0.1
    weight[:, :8] *= 6  # channels of different ranges, so per-channel scales differ
    scale = (np.abs(weight).max(0) / 127).astype(np.float32)
    w_int = np.round(weight / scale).astype(np.int8)
    x = (rng.standard_normal((T, K)) * 0.8).astype(np.float32)
    x_q = (np.clip(np.round(x / X_SCALE) + X_ZERO, 0, 255) - X_ZERO) * X_SCALE
    exact = x_q.astype(np.float64) @ (w_int.astype(np.float64) * scale)
    lo, hi = min(exact.min(), 0.0), max(exact.max(), 0.0)
    y_scale, y_zero = (hi - lo) / 255, int(round(-lo / ((hi - lo) / 255)))
    inits = [numpy_helper.from_array(np.array(X_SCALE, np.float32), "xs"),
             numpy_helper.from_array(np.array(X_ZERO, np.uint8), "xz"),
             numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(y_zero, np.uint8), "yz"),
             numpy_helper.from_array(np.zeros(N, np.int8), "wz"), numpy_helper.from_array(scale, "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    if kind == "matmul":
        inits.append(numpy_helper.from_array(w_int, "wq"))
        nodes += [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                  helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        shape_in, shape_out, feed = [T, K], [T, N], x
    else:
        inits.append(numpy_helper.from_array(w_int.T.reshape(N, K, 1, 1).copy(), "wq"))
        nodes += [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                  helper.make_node("Conv", ["xd", "wd"], ["y"])]
        shape_in, shape_out, feed = [1, K, T, 1], [1, N, T, 1], x.T.reshape(1, K, T, 1).copy()
    nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape_out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, feed, exact


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((x - ref) ** 2), 1e-30)))


def main() -> int:
    rng = np.random.default_rng(0)
    print("| unit | " + " | ".join(f"CPU EP `{level}`" for level in OPTIMIZATION_LEVELS) + " | QNN HTP |")
    print("|---|" + "---|" * (len(OPTIMIZATION_LEVELS) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("matmul", "conv"):
            model, feed, exact = mac_unit(kind, rng)
            path = Path(tmp) / f"{kind}.onnx"
            onnx.save(model, str(path))
            cells = []
            runs = [(level, "cpu") for level in OPTIMIZATION_LEVELS] + [("basic", "qnn-htp")]
            for level, provider in runs:
                session = create_session(path, provider, session_options(threads=1, graph_optimization_level=level),
                                         precision="w8a8")
                out = session.run(None, {"x": feed})[0].astype(np.float64)
                out = out.reshape(N, T).T if kind == "conv" else out
                cells.append(f"{sqnr_db(exact, out):.1f} dB")
            print(f"| {kind} | " + " | ".join(cells) + " |")
    print("SQNR vs exact integer arithmetic before the output's 8-bit rounding (that rounding alone: ~35 dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
