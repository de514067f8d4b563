"""Store QDQ weights as integers: fold ``QuantizeLinear(float initializer)`` into the quantized initializer.

aimet's QDQ export keeps every weight in float and quantizes it in the graph (float initializer -> QuantizeLinear ->
DequantizeLinear), so a "W8" graph is as large as the FP32 one (SD 1.5's low_res: 3.3 GB) and onnxruntime keeps the
float copy in memory. Folding the QuantizeLinear stores the weight as INT8 (a quarter of the bytes), the form
onnxruntime's own quantizer writes and QNN reads; the DequantizeLinear stays, so the graph computes the same values.
The integer initializer keeps the weight's name, so AIMET encodings (keyed by weight names) still match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..onnx_index import consumers


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def quantize_constant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: saturate(round_half_even(x / scale) + zero_point), per tensor or per
    ``axis`` (float32 division and rounding, as onnxruntime computes it)."""
    x = x.astype(np.float32)
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x / scale.astype(np.float32)).astype(np.int64) + zero_point.astype(np.int64)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def materialize_initializer_identities(graph: onnx.GraphProto) -> int:
    """Replace every ``Identity(initializer)`` by an initializer of the Identity's output name holding the same
    values (in place); returns how many. torch's exporter deduplicates equal parameters through such nodes (e.g.
    LayerNorm gammas that are all ones); left in, the QuantizeLinear after them does not fold and the HTP receives
    a computed LayerNorm gamma, which it rejects (graphAddNode error 1000, docs/qnn_htp.md). The name stays the
    one AIMET's encodings use for that tensor."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    copies = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs]
    for node in copies:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
    if copies:
        kept = [n for n in graph.node if not any(n is c for c in copies)]
        del graph.node[:]
        graph.node.extend(kept)
    return len(copies)


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Fold every QuantizeLinear whose input, scale and integer zero point are initializers (in place); returns
    how many. A float initializer that something else also reads stays, and the integer one takes the Q output's
    name instead of the weight's."""
    graph = model.graph
    materialize_initializer_identities(graph)
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    folded, kept_nodes, dropped, renamed = 0, [], set(), {}
    for node in graph.node:
        foldable = (node.op_type == "QuantizeLinear" and len(node.input) == 3
                    and all(name in inits for name in node.input) and _attr(node, "block_size", 0) == 0
                    and not any(a.name == "output_dtype" for a in node.attribute)
                    and node.output[0] not in outputs)
        if foldable:
            weight = inits[node.input[0]]
            zero = numpy_helper.to_array(inits[node.input[2]])
            foldable = weight.data_type == onnx.TensorProto.FLOAT and np.issubdtype(zero.dtype, np.integer)
        if not foldable:
            kept_nodes.append(node)
            continue
        values = quantize_constant(numpy_helper.to_array(weight), numpy_helper.to_array(inits[node.input[1]]),
                                   zero, _attr(node, "axis", 1))
        if len(readers[weight.name]) == 1:  # only this Q reads the float weight: the integer one replaces it
            dropped.add(weight.name)
            stored_name = weight.name
        else:
            stored_name = node.output[0]
        renamed[node.output[0]] = stored_name
        graph.initializer.append(numpy_helper.from_array(values, stored_name))
        folded += 1
    if folded:
        kept = [t for t in graph.initializer if not (t.name in dropped and t.data_type == onnx.TensorProto.FLOAT)]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        retyped = dropped | set(renamed)  # their recorded float types are stale: shape inference would refuse them
        infos = [v for v in graph.value_info if v.name not in retyped]
        del graph.value_info[:]
        graph.value_info.extend(infos)
        for reader in kept_nodes:
            for i, name in enumerate(reader.input):
                if name in renamed:
                    reader.input[i] = renamed[name]
        del graph.node[:]
        graph.node.extend(kept_nodes)
    return folded


def fold_weight_quantizers_file(path: Path) -> int:
    """``fold_weight_quantizers`` on an ONNX file, rewritten in place (one external ``.data`` file beside it when
    the integer weights still exceed protobuf's 2 GB)."""
    from ..export.to_onnx import PROTOBUF_LIMIT

    model = onnx.load(str(path), load_external_data=True)
    count = fold_weight_quantizers(model)
    if count:
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        if weight_bytes > PROTOBUF_LIMIT * 0.9:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    return count
