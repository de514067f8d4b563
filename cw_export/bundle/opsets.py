"""Each graph's real opset, read from the ONNX file the bundle ships, recorded in its manifest entry.

The recipe's ``export.opset`` (17) is what the FP32 exporter was asked for; the quantizers raise a graph to opset 21
(16-bit QuantizeLinear/DequantizeLinear need it). ``graphs.<name>.opset`` is the default-domain opset of the file as
written, whatever produced it; the lint (``validate.lint.opset_versions_check``) checks it against the file.
"""

from __future__ import annotations

from pathlib import Path


def default_opset(model) -> int | None:
    """The default-domain ("" / "ai.onnx") opset an ONNX ModelProto imports, or None."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)


def record_graph_opsets(bundle: Path, manifest: dict) -> None:
    """Set ``manifest["graphs"][name]["opset"]`` from each graph file in ``bundle`` (read without its weights)."""
    import onnx

    for entry in manifest["graphs"].values():
        model = onnx.load(str(Path(bundle) / entry["file"]), load_external_data=False)
        entry["opset"] = default_opset(model)
