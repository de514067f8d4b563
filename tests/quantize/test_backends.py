"""Both backends on one graph (high_res_in: it carries the time features) with the same calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper
import pytest

from cw_export.calibrate.collect import collect, settings_for
from cw_export.errors import RecipeError
from cw_export.parity.measure import graph_sqnr
from cw_export.quantize import BACKENDS, GraphJob, check_settings, get_backend
from cw_export.recipe import load_recipe
from cw_export.contract.manifest import read_manifest
from cw_export.runtime.sessions import create_session, session_config

GRAPH = "high_res_in"


@pytest.fixture(scope="module")
def setup(tiny_model, fp32_bundle):
    from cw_export.calibrate.stage import tokenizer_fn
    from cw_export.export.torch_graphs import torch_graphs

    manifest = read_manifest(fp32_bundle)
    prompts = ["a red square", "a blue circle"]
    settings = settings_for(manifest, tiny_model.source["sha256"], prompts, seed=0, samples_per_graph=4)
    graphs = torch_graphs(tiny_model, manifest)
    data = collect(manifest, graphs, tokenizer_fn(tiny_model), prompts, settings)
    return fp32_bundle, graphs[GRAPH], data.graphs[GRAPH]


def quantize(backend: str, setup, tmp_path: Path, bits: int = 16):
    bundle, graph, data = setup
    job = GraphJob(GRAPH, bundle / "graphs" / f"{GRAPH}.onnx", graph.module, graph.input_names,
                   graph.output_names, data, bits)
    result = get_backend(backend).quantize_graph(job, load_recipe("snapdragon-w8a16").quantization,
                                                 tmp_path / "graphs")
    session = create_session(result.file, config=session_config("basic"))
    return result, graph_sqnr(session, graph, data)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_w8a16_graph_is_qdq_and_close_to_fp32(backend, setup, tmp_path):
    result, sqnr = quantize(backend, setup, tmp_path)
    model = onnx.load(str(result.file))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [i.name for i in model.graph.input] == setup[1].input_names
    assert sqnr["sqnr_db"] >= 30.0, sqnr  # the W8A16 goal; measured ~45 dB on the tiny model
    assert sqnr["sqnr_db"] < 200.0  # really quantized: not bit-exact with FP32


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_time_features_are_16_bit_in_an_8_bit_graph(backend, setup, tmp_path):
    """The graph takes the runtime's sinusoidal features: no float Sin/Cos path is left, and its input quantizer is
    16-bit while the rest of the graph is 8-bit."""
    result, sqnr = quantize(backend, setup, tmp_path, bits=8)
    assert result.details["time_features_bits"] == 16
    model = onnx.load(str(result.file))
    assert not {"Sin", "Cos"} & {n.op_type for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "time_features"]
    assert quantizers, "time_features must be quantized"
    assert {inits[q.input[2]].data_type for q in quantizers} == {onnx.TensorProto.UINT16}
    for q in quantizers:  # the fixed range [-1, 1] of sin/cos, not min-max of the calibration timesteps
        scale = float(numpy_helper.to_array(inits[q.input[1]]))
        zero = int(numpy_helper.to_array(inits[q.input[2]]))
        assert -zero * scale == pytest.approx(-1.0, abs=1e-3) and (65535 - zero) * scale == pytest.approx(1.0, abs=1e-3)
    activation_zero_points = {inits[n.input[2]].data_type for n in model.graph.node
                              if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[2] in inits}
    assert onnx.TensorProto.UINT8 in activation_zero_points  # the rest is 8-bit
    assert sqnr["sqnr_db"] >= 20.0, sqnr


def test_aimet_backend_writes_encodings_and_16bit_timestep(setup, tmp_path):
    result, _ = quantize("aimet", setup, tmp_path, bits=8)
    assert result.encodings is not None and result.encodings.is_file()
    encodings = json.loads(result.encodings.read_text())
    assert encodings["version"] == "1.0.0"
    params = encodings["param_encodings"]
    assert params and all(e["bw"] == 8 for e in params)
    assert any(len(e.get("scale", [])) > 1 for e in params), "weights must be per-channel"
    assert (result.encodings.parent / f"{GRAPH}.onnx").is_file()  # the graph the encodings refer to
    # weights stored as integers (quantize.fold), not float initializers quantized in the graph
    model = onnx.load(str(result.file))
    float_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert result.details["weights_stored_quantized"] > 0
    assert not [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in float_inits]


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(RecipeError, match="aimet, ort"):
        get_backend("tflite")


def test_recipe_quantization_settings_are_checked():
    recipe = load_recipe("snapdragon-int8")
    check_settings(recipe.quantization)
    bad = recipe.with_quantization(activation_bits={"low_res": 4})
    with pytest.raises(RecipeError, match="activation_bits.low_res"):
        check_settings(bad.quantization)
    with pytest.raises(RecipeError, match="unknown graph"):
        check_settings(recipe.with_quantization(a8_candidates=["unet"]).quantization)


def test_graph_size_counts_external_data(tmp_path):
    """A >2 GB graph's .onnx file is small (its weights sit in .onnx.data): the ort backend must count both to pick
    external-data saving (found on SD 1.5's low_res: 'Failed to serialize proto')."""
    from cw_export.quantize.ort_backend import graph_bytes

    (tmp_path / "low_res.onnx").write_bytes(b"x" * 10)
    (tmp_path / "low_res.onnx.data").write_bytes(b"x" * 1000)
    (tmp_path / "high_res_in.onnx").write_bytes(b"x" * 5)  # another graph's file is not counted
    assert graph_bytes(tmp_path / "low_res.onnx") == 1010


def test_raise_opset_keeps_external_data_and_numerics(tmp_path):
    """The ort backend raises a graph to opset 21 itself, without loading its weights (onnxruntime's own conversion
    serialises the whole proto: fails above 2 GB). ReduceMean is one op whose form changes (axes attribute -> input)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from cw_export.quantize.ort_backend import raise_opset
    from cw_export.runtime.sessions import create_session

    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("ReduceMean", ["y"], ["z"], axes=[1], keepdims=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 1])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.onnx.data", size_threshold=0)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    before = create_session(path).run(None, {"x": x})[0]

    assert raise_opset(path) is True
    converted = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert converted.graph.initializer[0].data_location == TensorProto.EXTERNAL  # weights were not pulled in
    np.testing.assert_allclose(create_session(path).run(None, {"x": x})[0], before, rtol=1e-6)
    assert raise_opset(path) is False  # already there


def test_ort_backend_layernorm_gamma_places_on_qnn_htp(setup, tmp_path):
    """LayerNorm gammas are UINT8 asymmetric (the form the QNN HTP accepts; signed INT8 symmetric is refused), and
    the ort backend's high_res_in then runs entirely on the emulated HTP, CPU fallback disabled."""
    import numpy as np
    from onnx import numpy_helper

    result, _ = quantize("ort", setup, tmp_path)
    model = onnx.load(str(result.file))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    # (the export may share one initializer between equal gammas: counted per initializer)
    assert norms and result.details["uint8_layernorm_gammas"] == len({n.input[1] for n in norms})
    for norm in norms:
        dq = producer[norm.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.uint8, norm.name
    htp = create_session(result.file, "qnn-htp", config=session_config("basic"), precision="w8a16")
    cpu = create_session(result.file, config=session_config("basic"))
    feeds = next(iter(setup[2].subset(1)))
    names = [o.name for o in htp.get_outputs()]
    for name, a, b in zip(names, htp.run(None, feeds), cpu.run(None, feeds)):
        noise = np.mean((a.astype(np.float64) - b) ** 2)
        assert 10 * np.log10(np.mean(b.astype(np.float64) ** 2) / max(noise, 1e-30)) >= 40.0, name
