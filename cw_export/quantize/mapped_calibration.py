"""Activation ranges of an FP32 graph for onnxruntime's quantizer, with the graph's weights mapped, not copied.

onnxruntime's ``quantize_static`` calibrates through a calibrator that loads the whole graph with its weights,
saves an augmented copy (the weights written out again) and opens a session on that copy (the weights read in
once more). Measured on SD 1.5's low_res (3.1 GB, 16-bit, 8 samples; bench/quantize_memory.py): the quantize step
peaked at 9.98 GiB RSS; for SDXL's 10 GB low_res that cannot fit a 24 GB machine (issue #21).

Here the same onnxruntime calibrator class computes the same ranges, but:
  - it is built on the graph without its external data (only the small proto: names, shapes, nodes);
  - its augmented graph is written beside the graph, so it keeps pointing at the graph's own ``.data`` file, whose
    tensors start on page boundaries (``external_data.gather_external_data``) so onnxruntime maps them.
The session keeps onnxruntime's weight pre-packing (an anonymous copy of the MatMul weights): without it the
activations differ in the last bits (scales up to 1.6e-6 relative on SD 1.5's low_res), with it the ranges are
onnxruntime's own. They go to ``quantize_static`` as its calibration cache (``save_tensors_data``), so the quantizer
itself runs unchanged, and the QDQ graph is onnxruntime's byte for byte (tests/quantize/test_mapped_calibration.py;
SD 1.5's low_res: the .onnx and its .data identical).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

# quantize_static's names for the calibrator options in its extra_options (onnxruntime.quantization.quantize)
CALIBRATOR_OPTIONS = {
    "CalibTensorRangeSymmetric": "symmetric",
    "CalibMovingAverage": "moving_average",
    "CalibMovingAverageConstant": "averaging_constant",
    "CalibMaxIntermediateOutputs": "max_intermediate_outputs",
    "CalibPercentile": "percentile",
}
AUGMENTED_NAME = "calibration-augmented.onnx"


def op_types_to_calibrate(config) -> list[str]:
    """The op types ``quantize_static`` calibrates for this config: its own, else every quantizable one."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return list(config.op_types_to_quantize or set(QLinearOpsRegistry) | set(QDQRegistry))


def _shape_inferred_without_data(model_path: Path):
    """``quant_utils.load_model_with_shape_infer`` without reading the external data: shape inference runs on the
    file, and only the proto is loaded."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata, generate_identified_filename

    inferred = generate_identified_filename(Path(model_path), "-inferred")
    onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
    model = onnx.load(str(inferred), load_external_data=False)
    add_infer_metadata(model)
    inferred.unlink()
    return model


@contextlib.contextmanager
def _calibrator_reads_no_weights():
    from onnxruntime.quantization import calibrate

    with mock.patch.object(calibrate, "load_model_with_shape_infer", _shape_inferred_without_data):
        yield


def calibrate_mapped(model_path: Path, reader, config, cache: Path) -> Path:
    """Run onnxruntime's calibrator for ``config`` (a ``StaticQuantConfig``) over ``reader`` on the graph at
    ``model_path`` with its weights mapped; write the ranges to ``cache`` (``quantize_static``'s
    ``calibration_cache_path``) and return it. ``model_path``'s external data must lie beside it."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    extra = config.extra_options or {}
    options = {key: extra[name] for name, key in CALIBRATOR_OPTIONS.items() if name in extra}
    with _calibrator_reads_no_weights():
        calibrator = create_calibrator(Path(model_path), op_types_to_calibrate(config),
                                       augmented_model_path=str(Path(model_path).parent / AUGMENTED_NAME),
                                       calibrate_method=config.calibrate_method, use_external_data_format=False,
                                       providers=config.calibration_providers, extra_options=options)
    try:
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    finally:
        del calibrator
        (Path(model_path).parent / AUGMENTED_NAME).unlink(missing_ok=True)
    save_tensors_data(ranges, cache)
    return cache


def quantize_with_ranges(model_path: Path, out: Path, config, cache: Path) -> None:
    """``onnxruntime.quantization.quantize`` for a ``StaticQuantConfig``, with the ranges read from ``cache``
    instead of a calibration run (every other argument as ``quantize`` passes it)."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(model_path), str(out), None, calibrate_method=config.calibrate_method,
                    quant_format=config.quant_format, activation_type=config.activation_type,
                    weight_type=config.weight_type, op_types_to_quantize=config.op_types_to_quantize,
                    nodes_to_quantize=config.nodes_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                    per_channel=config.per_channel, reduce_range=config.reduce_range,
                    use_external_data_format=config.use_external_data_format,
                    calibration_providers=config.calibration_providers, extra_options=config.extra_options,
                    calibration_cache_path=str(cache))
