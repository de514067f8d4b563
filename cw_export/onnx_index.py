"""Who writes and who reads each tensor of an ONNX graph: the two maps every graph rewrite and lint walks."""

from __future__ import annotations

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (graph inputs and initializers have none)."""
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, once per input slot (a node reading a tensor twice is listed twice,
    so ``len`` counts the reads)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def tensor_shapes(graph: onnx.GraphProto, initializers: bool = True) -> dict[str, list[int]]:
    """Tensor name -> its dims as the graph annotates them (inputs, outputs, value_info and, with ``initializers``,
    weights), -1 where a dim is symbolic or unknown. Run on an ``onnx.shape_inference`` result to see every tensor."""
    shapes = {}
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    if initializers:
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
    return shapes


def inferred_shapes(model: onnx.ModelProto, initializers: bool = True) -> dict[str, list[int]]:
    """``tensor_shapes`` of ``model`` after onnx shape inference (on the structure; weights are not needed)."""
    return tensor_shapes(onnx.shape_inference.infer_shapes(model).graph, initializers)


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (in place) with its ``value_info`` inferred anew from the graph as it is now, strictly.

    Rewrites after quantization (the HTP forms' 3-D SiLU views, the mixed-precision merge of 8-bit quantization
    parameters into a 16-bit graph) leave the value_info of the tensors they touch describing the old graph: a 4-D
    shape on a now 3-D tensor, uint16 on a now uint8 one. onnxruntime then prints "Error merging shape info" for every
    graph (onnxruntime-node does) and onnx's strict shape inference and ``check_model(full_check=True)`` reject it.
    Inference runs on the structure only (initializer dims; external weights are not read); ``strict_mode`` raises
    instead of saving a graph whose annotations onnx cannot derive."""
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def default_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain ("" / "ai.onnx") opset a model imports, or None."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
