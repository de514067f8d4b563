"""Small ONNX graphs the QNN HTP tests share: a saver and a QDQ conv that places on the HTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_graph(nodes, inputs, outputs, initializers, path: Path, check: bool = True) -> Path:
    """An opset-21 model of these nodes at ``path`` (``check``: run the ONNX checker first)."""
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quantized_conv(folder: Path, name: str) -> tuple[Path, Path, list[np.ndarray]]:
    """(FP32 Conv + Relu, its static QDQ at ``folder/name`` with onnxruntime's QNN config: INT8 per-channel weights,
    UINT8 activations; the calibration inputs). It places on the HTP."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.2, "W")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B")
    fp32 = save_graph([helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                       helper.make_node("Relu", ["c"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [weight, bias],
                      folder / "conv_fp32.onnx")
    data = [rng.standard_normal((1, 4, 16, 16)).astype(np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(data)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"x": item}

    config = get_qnn_qdq_config(str(fp32), Reader(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=True, weight_symmetric=True)
    config.extra_options["UseQDQContribOps"] = False
    qdq = folder / name
    quantize(str(fp32), str(qdq), config)
    return fp32, qdq, data
