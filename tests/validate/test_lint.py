"""The cross-format lint of ``cw-export validate`` on a real INT8 (aimet) bundle: the intact bundle passes, and each
deliberate inconsistency between its formats is caught by the named check, after the tampered files and the
manifest were re-hashed (as someone hiding the change from the sha256 table would), so the lint itself must see it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cw_export.cli import main
from cw_export.contract.manifest import list_files, manifest_bytes

SMALL = {"calibration_prompts": 1, "calibration_samples": 4, "a8_candidates": []}  # no a8 sweep: one export each


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    """snapdragon-int8 with the aimet backend (encodings + QDQ graphs), smallest budgets, 2 steps."""
    import torch

    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    root = tmp_path_factory.mktemp("lint")
    recipe = (load_recipe("snapdragon-int8").with_build(steps=2, clock=2)
              .with_quantization(backend="aimet", **SMALL).with_parity(heldout_prompts=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more threads only slow the build down
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CW_EXPORT_CACHE", str(root / "cache"))  # never the user's ~/.cache
            return build_bundle(recipe, BuildOptions(model="tiny-random", out=root / "bundle", progress=False,
                                                     allow_low_parity=True))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def bundle(int8_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(int8_bundle, tmp_path / "bundle"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _rehash(bundle: Path, manifest: dict | None = None) -> None:
    """Re-list every file (and re-hash the manifest itself), so the sha256 check passes and only the lint can tell."""
    manifest = manifest or _manifest(bundle)
    manifest["files"] = list_files(bundle)
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))


def _validate(bundle: Path, capsys) -> tuple[int, dict[str, str]]:
    """Exit code and {check name: 'PASS detail' / 'FAIL detail'} of ``cw-export validate --no-parity``."""
    capsys.readouterr()
    code = main(["validate", str(bundle), "--no-parity"])
    lines = {}
    for line in capsys.readouterr().out.splitlines():
        if line[:4] in ("PASS", "FAIL"):
            status, rest = line[:4], line[6:]
            name, _, detail = rest.partition("  ")
            lines[name.strip()] = f"{status} {detail.strip()}"
    return code, lines


def _failed(lines: dict[str, str]) -> list[str]:
    return sorted(name for name, text in lines.items() if text.startswith("FAIL"))


def _quantized_graphs(manifest: dict) -> list[str]:
    return sorted(n for n, g in manifest["graphs"].items() if (g.get("quantization") or {}).get("encodings"))


def test_intact_bundle_passes_every_lint_check(int8_bundle, capsys):
    code, lines = _validate(int8_bundle, capsys)
    assert code == 0, lines
    graphs = _quantized_graphs(_manifest(int8_bundle))
    assert len(graphs) == 5  # the UNet-side graphs, the text encoder and the VAE decoder
    for name in graphs:
        for check in ("onnx + I/O", "encodings", "encodings vs QDQ", "QDQ pairs"):
            assert lines[f"{name} {check}"].startswith("PASS"), (name, check, lines)
        assert "tensors quantized alike" in lines[f"{name} encodings vs QDQ"]
    assert lines["opset + versions"].startswith("PASS")


def _encoded_and_quantized(bundle: Path, name: str) -> tuple[dict, list[str], str]:
    """(the graph's encodings JSON, activation names the QDQ graph quantizes too, an unquantized tensor of the
    encodings graph outside the scopes the two exports express differently)."""
    from cw_export.validate.lint import _Graph, _reexpressed_scopes

    quant = _manifest(bundle)["graphs"][name]["quantization"]
    encodings = json.loads((bundle / quant["encodings"]).read_text())
    deployed = _Graph(bundle / _manifest(bundle)["graphs"][name]["file"])
    plain = _Graph(bundle / quant["details"]["encodings_graph"])
    quantized = deployed.quantized()
    names = {e["name"] for e in encodings["activation_encodings"] + encodings["param_encodings"]}
    skipped = _reexpressed_scopes(deployed, plain)
    both = [e["name"] for e in encodings["activation_encodings"]
            if e["name"] in quantized and deployed.scope(e["name"]) not in skipped]
    free = sorted(out for node in plain.model.graph.node if node.op_type not in ("Constant", "Shape")
                  for out in node.output if out not in names and out not in quantized
                  and plain.scope(out) not in skipped)
    return encodings, both, free[0]


def test_a_renamed_encoding_is_caught(bundle, capsys):
    """(a) one activation encoding renamed to a tensor that exists nowhere."""
    name = _quantized_graphs(_manifest(bundle))[0]
    encodings, both, _ = _encoded_and_quantized(bundle, name)
    entry = next(e for e in encodings["activation_encodings"] if e["name"] == both[1])
    entry["name"] = both[1] + "_renamed"
    path = bundle / _manifest(bundle)["graphs"][name]["quantization"]["encodings"]
    path.write_text(json.dumps(encodings, indent=1))
    _rehash(bundle)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert lines["files sha256"].startswith("PASS")
    assert _failed(lines) == [f"{name} encodings", f"{name} encodings vs QDQ"]
    detail = lines[f"{name} encodings vs QDQ"]
    assert f"1 QDQ-quantized tensor(s) have no encoding, e.g. {both[1]!r}" in detail
    assert f"1 encoding(s) name tensors the QDQ graph does not quantize, e.g. {both[1] + '_renamed'!r}" in detail


def test_an_encoding_moved_to_an_unquantized_tensor_is_caught_only_by_the_cross_check(bundle, capsys):
    """(a') renamed to a real tensor of the encodings graph that nothing quantizes: the per-file encodings check
    cannot see it (the name exists), the encodings-vs-QDQ cross-check does."""
    name = _quantized_graphs(_manifest(bundle))[-1]
    encodings, both, free = _encoded_and_quantized(bundle, name)
    next(e for e in encodings["activation_encodings"] if e["name"] == both[0])["name"] = free
    (bundle / _manifest(bundle)["graphs"][name]["quantization"]["encodings"]).write_text(json.dumps(encodings))
    _rehash(bundle)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert lines[f"{name} encodings"].startswith("PASS")
    assert _failed(lines) == [f"{name} encodings vs QDQ"]
    assert repr(free) in lines[f"{name} encodings vs QDQ"] and repr(both[0]) in lines[f"{name} encodings vs QDQ"]


def _rescale_dq_scale(bundle: Path, name: str, dq_of, factor: float) -> tuple[onnx.NodeProto, dict]:
    """Give the DequantizeLinear ``dq_of(model, inits, producers)`` picks in graph ``name`` its own scale, ``factor``
    times the old one, save and re-hash; returns that node and the producers map."""
    path = bundle / _manifest(bundle)["graphs"][name]["file"]
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dq = dq_of(model, inits, producers)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    model.graph.initializer.append(numpy_helper.from_array((scale * factor).astype(scale.dtype), "tampered_scale"))
    dq.input[1] = "tampered_scale"
    onnx.save(model, str(path))
    _rehash(bundle)
    return dq, producers


def test_a_qdq_pair_with_a_mismatched_scale_is_caught(bundle, capsys):
    """(b) one DequantizeLinear given its own scale, twice its QuantizeLinear's."""
    name = _quantized_graphs(_manifest(bundle))[0]
    dq, producers = _rescale_dq_scale(bundle, name, lambda model, inits, producers: next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers
        and producers[n.input[0]].op_type == "QuantizeLinear" and n.input[0] not in inits), 2)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert _failed(lines) == [f"{name} QDQ pairs"]
    tensor = producers[dq.input[0]].input[0]
    assert f"{tensor}: QuantizeLinear and DequantizeLinear" in lines[f"{name} QDQ pairs"]
    assert "use different scale" in lines[f"{name} QDQ pairs"]


def test_a_bias_scale_off_input_times_weight_scale_is_caught(bundle, capsys):
    """(b') one MAC's int32 bias given a scale 257x too small (the SD 1.5 mix's bug: the CPU EP still dequantizes it
    right, the QNN HTP computes the bias at input x weight scale, -12 dB there): the QDQ pairs line names the MAC."""
    name = _quantized_graphs(_manifest(bundle))[0]
    macs = []

    def bias_dq(model, inits, producers):
        mac = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 2
                   and n.input[2] in producers and producers[n.input[2]].op_type == "DequantizeLinear"
                   and inits[producers[n.input[2]].input[0]].data_type == onnx.TensorProto.INT32)
        macs.append(mac.name)
        return producers[mac.input[2]]

    _rescale_dq_scale(bundle, name, bias_dq, 1 / 257)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert _failed(lines) == [f"{name} QDQ pairs"]
    assert (f"1 MAC(s) whose int32 bias scale is not input scale x weight scale (the QNN HTP computes them wrong), "
            f"e.g. {macs[0]}") in lines[f"{name} QDQ pairs"]


def test_a_manifest_io_shape_edit_is_caught(bundle, capsys):
    """(c) an output shape changed in the manifest (manifest self-hash recomputed)."""
    manifest = _manifest(bundle)
    name = _quantized_graphs(manifest)[0]
    output = manifest["graphs"][name]["outputs"][0]
    original = list(output["shape"])
    output["shape"][-1] += 1
    _rehash(bundle, manifest)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert lines["files sha256"].startswith("PASS")
    assert _failed(lines) == [f"{name} onnx + I/O"]
    assert (f"output {output['name']}: shape {original} in the ONNX graph, {output['shape']} in the manifest"
            in lines[f"{name} onnx + I/O"])


def test_declared_bit_width_and_opset_are_checked_against_the_graphs(bundle, capsys):
    """A manifest that says 8-bit activations for a 16-bit graph, and another opset than the graph's."""
    manifest = _manifest(bundle)
    name = _quantized_graphs(manifest)[0]
    manifest["graphs"][name]["quantization"]["activation_bits"] = 8
    manifest["graphs"][name]["quantization"]["details"]["time_features_bits"] = None
    manifest["graphs"]["text_encoder"]["quantization"]["details"]["opset"] = 16  # every graph is quantized now
    _rehash(bundle, manifest)
    code, lines = _validate(bundle, capsys)
    assert code == 2
    assert "zero point uint16 is not 8-bit as the manifest declares" in lines[f"{name} QDQ pairs"]
    assert lines["opset + versions"].startswith("FAIL")
    assert "text_encoder: opset 21 in the ONNX graph, 16 in the manifest" in lines["opset + versions"]


def test_int8_readme_gives_io_quantization_and_measured_parity(int8_bundle):
    """The hand-off document of a quantized bundle: each quantized boundary's scale/zero point, equal to the
    encodings' values, and the gate's numbers."""
    manifest = _manifest(int8_bundle)
    doc = (int8_bundle / "README.md").read_text(encoding="utf-8")
    name = _quantized_graphs(manifest)[0]
    quant = manifest["graphs"][name]["quantization"]
    encodings = {e["name"]: e for e in json.loads((int8_bundle / quant["encodings"]).read_text())[
        "activation_encodings"]}
    model = onnx.load(str(int8_bundle / manifest["graphs"][name]["file"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rows = 0
    inputs = {s["name"] for s in manifest["graphs"][name]["inputs"]}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inputs:
            tensor = node.input[0]
            scale, zero = inits[node.input[1]].reshape(-1)[0], inits[node.input[2]].reshape(-1)[0]
            row = next(line for line in doc.splitlines() if line.startswith(f"| input | `{tensor}` |"))
            assert f"scale={float(scale)!r} zero_point={int(zero)}" in row
            assert f"offset={encodings[tensor]['offset'][0]}" in row and int(zero) == -encodings[tensor]["offset"][0]
            rows += 1
    assert rows >= 1
    assert f"Final latent PSNR: **{manifest['parity']['final_latent_psnr_db']:.2f} dB**" in doc
    for graph, result in manifest["parity"]["graphs"].items():
        assert f"| `{graph}` | {result['sqnr_db']:.2f} |" in doc
    assert np.isfinite(manifest["parity"]["final_latent_psnr_db"])
