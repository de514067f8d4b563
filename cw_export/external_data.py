"""External data of ONNX graphs over the protobuf's 2 GB: one ``<graph>.onnx.data`` file beside the graph, every
tensor at a page-aligned offset, so that onnxruntime maps the weights from the file (page cache, clean and
reclaimable) instead of reading them into anonymous memory. Used by the export (the TorchScript exporter's
per-tensor files) and the quantizer (onnxruntime's preprocessed graph, before calibration)."""

from __future__ import annotations

from pathlib import Path

EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the protobuf (onnx's own default)
PAGE = 4096  # external tensors start on a page boundary, so onnxruntime can map them


def gather_external_data(path: Path) -> None:
    """Move every tensor of ``path`` of at least ``EXTERNAL_THRESHOLD`` bytes into one ``<file>.data`` beside it,
    one tensor at a time, at page-aligned offsets.

    The TorchScript exporter writes a graph over 2 GB as one file per tensor. Loading them all to re-save held a
    second copy of the graph's weights beside the torch model's (3.3 GB for SD 1.5's low_res, 10 GB for SDXL's):
    the export's memory peak. Page-aligned offsets let onnxruntime map tensors from the file instead of copying."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = path.parent.resolve()
    model = onnx.load(str(path), load_external_data=False)
    data_name = f"{path.name}.data"
    staging = folder / f"{data_name}.partial"
    sources: set[Path] = set()
    offset = 0
    with open(staging, "wb") as out:
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                source = (folder / info.location).resolve()
                if source.parent != folder:
                    raise ValueError(f"{path.name}: external tensor {tensor.name!r} outside the graph's folder")
                sources.add(source)
                with open(source, "rb") as data_file:
                    data_file.seek(info.offset or 0)
                    data = data_file.read(info.length) if info.length else data_file.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                data = tensor.raw_data
            else:
                continue
            padding = (-offset) % PAGE
            out.write(b"\0" * padding)
            offset += padding
            out.write(data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += len(data)
            del data
    for source in sources:
        source.unlink(missing_ok=True)
    staging.replace(folder / data_name)
    onnx.save_model(model, str(path))
