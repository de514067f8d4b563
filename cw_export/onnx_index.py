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


SMALL_TENSOR_BYTES = 1 << 20  # scales, zero points, biases: inline; weights above this stay in their external file


def load_with_small_tensors(path, max_external_bytes: int = SMALL_TENSOR_BYTES) -> onnx.ModelProto:
    """The graph at ``path`` with every external initializer up to ``max_external_bytes`` read inline, the larger
    ones (weights) left as references to the external file beside ``path``.

    A reference holds only a file name and an offset, so one copied into another graph points into that graph's
    file: the a8 sweep copies scales and biases from the 8-bit graph into the 16-bit one, and with both saved as
    external data (SD 1.5's low_res: ``low_res.onnx.data`` in each folder) the copies read the 16-bit file at the
    8-bit file's offsets (measured: 34 bias scales of 0 in SD 1.5's mixed low_res)."""
    from pathlib import Path

    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(path), load_external_data=False)
    base_dir = str(Path(path).parent)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        length = {e.key: e.value for e in tensor.external_data}.get("length")
        if length is not None and int(length) <= max_external_bytes:
            load_external_data_for_tensor(tensor, base_dir)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def copy_inline(target: onnx.TensorProto, source: onnx.TensorProto) -> None:
    """``target`` becomes ``source`` (name kept by the caller); refuses a source stored in external data, whose
    reference would resolve against the target graph's file (``load_with_small_tensors``)."""
    if source.data_location == onnx.TensorProto.EXTERNAL:
        raise RuntimeError(f"initializer {source.name} is stored in external data: load its graph with "
                           "load_with_small_tensors before copying from it")
    target.CopyFrom(source)
