"""What every graph a quantized (ort) build ships must satisfy, on one small W8A16 bundle (#20 A.9, B.8, B.10):

- the build's stderr stays clean: no numpy RuntimeWarning from onnxruntime's quantizer (CLIP's -inf causal mask
  gave scale inf / zero point NaN for the masked scores), and no Q/DQ scale in any graph is non-finite;
- value_info is consistent with the graph: strict shape inference and ``check_model(full_check=True)`` pass;
- each graph's manifest entry records the opset of the file, and the lint refuses another;
- each quantized graph places fully on the QNN HTP (CPU fallback disabled) under every onnxruntime optimisation
  level, as the hand-off README tells app teams.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cw_export.onnx_index import default_opset
from cw_export.validate.lint import _Graph, opset_versions_check, qdq_pair_check


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """snapdragon-w8a16 (ort) on tiny-random with the quantize tests' small budgets (conftest.small_recipe)."""
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    recipe = (load_recipe("snapdragon-w8a16").with_quantization(backend="ort", calibration_prompts=2,
                                                                calibration_samples=8)
              .with_parity(heldout_prompts=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = build_bundle(recipe, BuildOptions(model="tiny-random", out=tmp_path_factory.mktemp("shipped") / "b",
                                                   progress=False))
    manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    return Path(bundle), manifest, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _quantized(manifest: dict) -> list[str]:
    return sorted(n for n, g in manifest["graphs"].items() if g["precision"] != "fp32")


def test_quantization_warns_nothing_and_every_scale_is_finite(shipped):
    bundle, manifest, runtime_warnings = shipped
    assert not runtime_warnings, [f"{w.filename}:{w.lineno}: {w.message}" for w in runtime_warnings]
    text = manifest["graphs"]["text_encoder"]["quantization"]["details"]
    assert text["float_only_tensors"], "the causal-mask case was not exercised"  # the -inf scores exist, stay float
    for name in _quantized(manifest):
        model = onnx.load(str(bundle / manifest["graphs"][name]["file"]))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, name
        for node in qdq:
            scale = inits[node.input[1]]
            assert np.isfinite(scale).all() and (scale > 0).all(), (name, node.name, scale)
        float_only = set(manifest["graphs"][name]["quantization"]["details"].get("float_only_tensors", []))
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] in float_only for n in model.graph.node), name


def test_lint_refuses_a_non_finite_scale(shipped):
    bundle, manifest, _ = shipped
    spec = manifest["graphs"]["text_encoder"]
    graph = _Graph(bundle, spec["file"])
    assert qdq_pair_check("text_encoder", graph, spec["quantization"]).ok
    dq = next(n for n in graph.model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in graph.inits)
    tensor = graph.inits[dq.input[1]]
    tensor.CopyFrom(numpy_helper.from_array(np.full(tuple(tensor.dims), np.inf, np.float32), tensor.name))
    check = qdq_pair_check("text_encoder", graph, spec["quantization"])
    assert not check.ok and "is not finite and positive" in check.detail


def test_value_info_is_consistent_with_every_graph(shipped):
    bundle, manifest, _ = shipped
    for name, spec in sorted(manifest["graphs"].items()):
        path = bundle / spec["file"]
        model = onnx.load(str(path), load_external_data=False)
        assert model.graph.value_info, name  # annotated, and (below) correctly
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(str(path), full_check=True)


def test_every_graph_records_its_own_opset_and_the_lint_checks_it(shipped):
    bundle, manifest, _ = shipped
    for name, spec in manifest["graphs"].items():
        actual = default_opset(onnx.load(str(bundle / spec["file"]), load_external_data=False))
        assert spec["opset"] == actual, name
    assert {manifest["graphs"][n]["opset"] for n in _quantized(manifest)} == {21}
    assert opset_versions_check(bundle, manifest).ok
    tampered = json.loads(json.dumps(manifest))
    tampered["graphs"]["vae_decoder"]["opset"] = 17  # the recipe's export opset, not the graph's
    check = opset_versions_check(bundle, tampered)
    assert not check.ok and "vae_decoder: opset 21 in the ONNX graph, 17 in the manifest (graphs.opset)" in check.detail
    readme = (bundle / "README.md").read_text(encoding="utf-8")
    assert "; ONNX opset 21." in readme


def test_quantized_graphs_place_on_the_htp_under_every_optimisation_level(shipped):
    pytest.importorskip("onnxruntime_qnn")
    from cw_export.bundle.handoff import OPTIMISATION_LEVELS_PARAGRAPH
    from cw_export.runtime import sessions

    bundle, manifest, _ = shipped
    for name in _quantized(manifest):
        for level in ("basic", "extended", "all"):  # "all": onnxruntime's default, what app runtimes use
            options = sessions.session_options(graph_optimization_level=level)
            session = sessions._qnn_htp_session(bundle / manifest["graphs"][name]["file"], options, {})
            assert session.get_providers()[0] == sessions.QNN_EP, (name, level)
    readme = (bundle / "README.md").read_text(encoding="utf-8")
    assert OPTIMISATION_LEVELS_PARAGRAPH in readme and "`ORT_ENABLE_ALL`" in readme
