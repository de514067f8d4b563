"""Calibration with the weights mapped (quantize.mapped_calibration) gives onnxruntime's own QDQ graph, byte for byte,
without reading the weights into the calibrator."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cw_export.external_data import gather_external_data


class Samples:
    """onnxruntime's CalibrationDataReader interface over fixed feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def conv_matmul_graph(path, gelu: bool = False) -> None:
    """Conv -> Relu -> Reshape -> MatMul -> Add, weights in page-aligned external data beside ``path``; with
    ``gelu``, an Erf-form GELU after the MatMul (a sequence qnn_preprocess_model fuses into one Gelu)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w_conv"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b_conv"),
             numpy_helper.from_array(np.array([1, 8, 25], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((25, 16)).astype(np.float32), "w_mm"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b_mm")]
    nodes = [helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "w_mm"], ["m"], name="matmul"),
             helper.make_node("Add", ["g" if gelu else "m", "b_mm"], ["y"], name="add")]
    if gelu:
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("sqrt2", 1.4142135), ("one", 1.0), ("half", 0.5))]
        nodes[4:4] = [helper.make_node("Div", ["m", "sqrt2"], ["d"], name="gelu_div"),
                      helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
                      helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
                      helper.make_node("Mul", ["m", "e1"], ["me"], name="gelu_mul"),
                      helper.make_node("Mul", ["me", "half"], ["g"], name="gelu_half")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])], inits)
    # opset 17 for the GELU: at 21 onnxruntime's own optimizer makes it an ONNX Gelu before qnn_preprocess_model looks
    opset = 17 if gelu else 21
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    gather_external_data(path)


@pytest.mark.parametrize("bits, method", [(16, "MinMax"), (8, "Percentile")])
def test_mapped_ranges_give_onnxruntimes_own_qdq_graph_without_reading_the_weights(tmp_path, monkeypatch, bits,
                                                                                   method):
    from onnxruntime.quantization import CalibrationMethod, QuantType, calibrate, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from cw_export.quantize.mapped_calibration import calibrate_mapped, quantize_with_ranges

    source = tmp_path / "g.onnx"
    conv_matmul_graph(source)
    assert (tmp_path / "g.onnx.data").stat().st_size > 1000  # the weights really are external
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32) * (i + 1)} for i in range(4)]

    def config():
        made = get_qnn_qdq_config(str(source), Samples(feeds),
                                  activation_type={8: QuantType.QUInt8, 16: QuantType.QUInt16}[bits],
                                  weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                                  per_channel=True, weight_symmetric=True,
                                  calibration_providers=["CPUExecutionProvider"])
        made.extra_options["UseQDQContribOps"] = False
        if method == "Percentile":
            made.extra_options["CalibPercentile"] = 99.9
        return made

    quantize(str(source), str(tmp_path / "ort.onnx"), config())

    seen = []
    made_by_ort = calibrate.create_calibrator

    def spy(*args, **kwargs):
        seen.append(made_by_ort(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(calibrate, "create_calibrator", spy)
    mapped = config()
    ranges = calibrate_mapped(source, mapped.calibration_data_reader, mapped, tmp_path / "ranges.json")
    quantize_with_ranges(source, tmp_path / "mapped.onnx", mapped, ranges)

    assert (tmp_path / "mapped.onnx").read_bytes() == (tmp_path / "ort.onnx").read_bytes()
    (calibrator,) = seen
    weights = [t for t in calibrator.model.graph.initializer if t.name in ("w_conv", "w_mm")]
    assert len(weights) == 2 and all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in weights)
    assert not (tmp_path / "calibration-augmented.onnx").exists()  # the augmented graph is cleaned up


def test_the_quantizer_quantizes_the_model_it_loaded_not_a_reloaded_copy(tmp_path, monkeypatch):
    """qnn_preprocess_model's 'onnx.infer' mark made onnxruntime's quantizer save and reload the whole model (two
    more copies of the weights); the backend drops the mark, so that path must never run."""
    import onnxruntime.quantization.base_quantizer as base_quantizer

    from cw_export.quantize import GraphJob
    from cw_export.quantize.ort_backend import quantize_graph
    from cw_export.recipe import load_recipe

    def refuse(model):
        raise AssertionError("the quantizer reloaded the model with its weights")

    monkeypatch.setattr(base_quantizer, "save_and_reload_model_with_shape_infer", refuse)
    source = tmp_path / "g.onnx"
    conv_matmul_graph(source, gelu=True)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)} for _ in range(3)]
    job = GraphJob("low_res", source, None, ["x"], ["y"], Samples(feeds), 16)
    result = quantize_graph(job, load_recipe("snapdragon-w8a16").quantization, tmp_path / "q")
    shipped = onnx.load(str(result.file), load_external_data=False)
    assert {p.key: p.value for p in shipped.metadata_props}.get("onnx.infer") == "onnxruntime.quant"
    assert any(n.op_type == "QuantizeLinear" for n in shipped.graph.node)
    assert [n.op_type for n in shipped.graph.node].count("Gelu") == 1  # preprocessed: the mark was there to drop


def test_the_mapped_optimizer_step_gives_qnn_preprocess_models_own_graph(tmp_path):
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from cw_export.quantize.mapped_preprocess import INPUT_NAME, optimizer_maps_weights

    source = tmp_path / "g.onnx"
    conv_matmul_graph(source, gelu=True)
    (tmp_path / "ort").mkdir()
    assert qnn_preprocess_model(onnx.load(str(source)), str(tmp_path / "ort" / "pre.onnx"))
    work = tmp_path / "mapped"
    work.mkdir()
    with optimizer_maps_weights(work):
        assert qnn_preprocess_model(onnx.load(str(source)), str(work / "pre.onnx"), save_as_external_data=True,
                                    all_tensors_to_one_file=True)
    light = onnx.load(str(work / "pre.onnx"), load_external_data=False)
    weights = [t for t in light.graph.initializer if t.name in ("w_conv", "w_mm")]
    locations = {e.value for t in weights for e in t.external_data if e.key == "location"}
    # never loaded back into a proto: the optimized graph and the preprocessed one point at the optimizer's input
    assert len(weights) == 2 and locations == {f"{INPUT_NAME}.data"}
    assert (onnx.load(str(work / "pre.onnx")).SerializeToString()
            == onnx.load(str(tmp_path / "ort" / "pre.onnx")).SerializeToString())
