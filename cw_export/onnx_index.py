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
