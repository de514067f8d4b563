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


WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)
STUB_MIN_ELEMENTS = 1024  # float initializers this large are weights, never a shape-computing constant


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose float weights keep their name, type and dims but no values.

    onnx shape inference serialises the whole model first, and a protobuf message cannot exceed 2 GB: SD 1.5's
    low_res graph with its weights in memory (3.3 GB) failed there ("Failed to serialize proto"). Inference needs
    the weights' dims only; integer initializers (Reshape shapes and the like) keep their values."""
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    for init in source.initializer:
        elements = 1
        for d in init.dims:
            elements *= d
        if init.data_type in WEIGHT_TYPES and elements >= STUB_MIN_ELEMENTS:
            # dims and type only, as a graph input: an initializer with dims but no data fails onnx's checks
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    return light


def inferred_shapes(model: onnx.ModelProto, initializers: bool = True) -> dict[str, list[int]]:
    """``tensor_shapes`` of ``model`` after onnx shape inference, run on ``structure_only(model)`` (any size of
    weights; their dims come from the original's initializers)."""
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(structure_only(model)).graph, initializers=False)
    if initializers:
        shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    else:
        names = {init.name for init in model.graph.initializer}
        shapes = {name: dims for name, dims in shapes.items() if name not in names}
    return shapes


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
