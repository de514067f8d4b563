"""A bundle's ONNX graph read through the confinement (``contract.confine``): its bytes once, and every external data
location checked before onnxruntime, the ONNX checker or the lint sees the graph.

Given a path, onnxruntime opens the graph and resolves each initializer's external ``location`` itself: it follows
symlinks, and refuses an escaping location only with its own multi-line error. So the runtime hands it the bytes
read here and each external file mapped from the descriptor ``open_inside`` checked (``sessions.bundle_session``):
onnxruntime opens no file of a bundle.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Iterator

from ..contract.confine import bundle_parts, open_inside, read_inside
from ..errors import BundleError

if TYPE_CHECKING:
    import onnx


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph that can hold external data: initializers, sparse initializers and attribute
    tensors (Constant values), in subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                yield from _tensors(subgraph)


def read_graph(bundle: str | os.PathLike, rel: str) -> tuple[bytes, onnx.ModelProto, dict[str, str]]:
    """(the file's bytes, its ModelProto without external data, external location -> path in the bundle).

    Each location must itself be a path below the graph's folder (``confine.bundle_parts``: not absolute, no '..');
    the files it names are opened later through ``open_inside``, which refuses symlinks. A BundleError otherwise."""
    import onnx

    data = read_inside(bundle, rel)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # boundary: protobuf raises its own DecodeError types
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise BundleError(f"{bundle}: {rel} is not a readable ONNX graph ({detail})") from None
    folder = posixpath.dirname(rel)
    external: dict[str, str] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        if bundle_parts(location) is None:
            raise BundleError(f"{bundle}: {rel}: external data location {location!r:.160} is not a path inside the "
                              "bundle")
        external[location] = posixpath.join(folder, location) if folder else location
    return data, model, external


def check_external(bundle: str | os.PathLike, external: dict[str, str]) -> None:
    """Each external data file is a regular file inside the bundle (``open_inside``; a BundleError otherwise)."""
    for rel in external.values():
        open_inside(bundle, rel).close()


def external_bytes(bundle: str | os.PathLike, external: dict[str, str], tensor: onnx.TensorProto) -> bytes:
    """The raw bytes of an external-data tensor of a graph ``read_graph`` read, through ``open_inside``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open_inside(bundle, external[info["location"]]) as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(int(info["length"])) if "length" in info else handle.read()


def external_array(bundle: str | os.PathLike, external: dict[str, str], tensor: onnx.TensorProto):
    """The numpy value of an external-data tensor (the lint reads a few scales and zero points this way, never a
    whole weight file)."""
    import onnx
    from onnx import numpy_helper

    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = external_bytes(bundle, external, tensor)
    return numpy_helper.to_array(inline)
