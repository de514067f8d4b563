"""QNN context binaries (``cw-export --soc``): the SoC table, one-line errors before any heavy work, a QDQ graph that
places compiled for every known SoC and loaded back to run once, and an honest record of the built-in bundle's
graphs (docs/qnn_htp.md): which compile and, for the others, the one-line error that fails the build whole.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qdq_graphs import quantized_conv, save_graph
from user_errors import CliResult, assert_refused

from cw_export.cli import main
from cw_export.quantize.qnn.context_binaries import (CONTEXT_DIR, generate_context, load_context, load_socs, parse_socs)
from cw_export.errors import BundleError, InputError
from cw_export.parity.measure import sqnr_db
from cw_export.runtime.sessions import create_session, session_config

SMALL = {"calibration_prompts": 1, "calibration_samples": 4, "a8_candidates": []}
# What the snapdragon-int8 bundle's graphs do today, per quantization backend and graph: None = a context binary is
# produced, else a fragment of the one-line error. Measured with onnxruntime-qnn 2.7.0 (QNN 2.51); docs/qnn_htp.md
# explains them. When an export fix lets a graph place, this test fails: update the record and the docs.
EXPECTED = {
    "ort": {"high_res_in": None, "low_res": None, "high_res_out": None, "text_encoder": None, "vae_decoder": None},
    # aimet leaves functional ops (the resnets' shared SiLU, the Transpose before proj_out) float: the weight
    # DequantizeLinear of the layer after them has no QDQ node unit and stays on the CPU
    "aimet": {"high_res_in": "not placed on the HTP: DequantizeLinear",
              "low_res": "not placed on the HTP: DequantizeLinear",
              "high_res_out": "not placed on the HTP: DequantizeLinear",
              "text_encoder": "not placed on the HTP: DequantizeLinear",
              "vae_decoder": "not placed on the HTP: DequantizeLinear"},
}


@pytest.fixture(scope="module")
def qdq_conv(tmp_path_factory):
    """A Conv+Relu quantized with onnxruntime's QNN config (INT8 per-channel weights, UINT8 activations): it places
    on the HTP (tests/runtime/test_qnn_htp.py)."""
    _, qdq, data = quantized_conv(tmp_path_factory.mktemp("ctx"), "high_res_out.onnx")
    return qdq, data


def test_soc_table_has_the_published_ids():
    socs = load_socs()
    assert {n: (s.soc_model, s.htp_arch) for n, s in socs.items() if n in ("SM8450", "SM8550", "SM8650", "SM8750")} \
        == {"SM8450": (36, 69), "SM8550": (43, 73), "SM8650": (57, 75), "SM8750": (69, 79)}
    assert socs["SM8650"].provider_options() == {"soc_model": "57", "htp_arch": "75"}


def test_soc_flag_values_are_repeatable_comma_separated_and_checked():
    assert parse_socs(["sm8650,SM8550", "SM8650"]) == ("SM8650", "SM8550")
    assert parse_socs(None) == ()
    with pytest.raises(InputError, match=r"^unknown SoC 'SM9999'; known: SM8350, .*SM8650.* \(recipes/socs.toml\)$"):
        parse_socs(["SM8650", "sm9999"])


@pytest.mark.parametrize("args, message", [
    (["--soc", "SM9999"], "unknown SoC 'SM9999'; known: SM8350, SM8450"),
    (["--soc", ","], "--soc needs a SoC name"),
    (["--soc", "SM8650", "--target", "cpu-fp32"], "--soc only apply to quantized targets; target 'cpu-fp32' is FP32"),
])
def test_bad_soc_is_one_line_exit_2_and_nothing_written(args, message, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["--model", "tiny-random", "--out", str(out), "--quiet", *args])
    assert_refused(CliResult(code, *capsys.readouterr()), message, tmp_path)


@pytest.mark.parametrize("soc", sorted(load_socs()))
def test_qdq_graph_compiles_for_every_known_soc_and_loads_back(soc, qdq_conv, tmp_path):
    qdq, data = qdq_conv
    model, binary = generate_context(qdq, tmp_path / CONTEXT_DIR / soc / "high_res_out_ctx.onnx", load_socs()[soc])
    assert model.is_file() and binary == model.parent / "high_res_out_ctx_qnn.bin" and binary.stat().st_size > 0
    node = onnx.load(str(model)).graph.node
    assert [n.op_type for n in node] == ["EPContext"]
    attrs = {a.name: a for a in node[0].attribute}
    assert attrs["embed_mode"].i == 0 and attrs["ep_cache_context"].s.decode() == binary.name
    session = load_context(model)  # the device path: only backend_path, CPU fallback disabled
    assert session.get_providers()[0] == "QNNExecutionProvider"
    (actual,) = session.run(["y"], {"x": data[0]})
    (expected,) = create_session(qdq, config=session_config("basic")).run(["y"], {"x": data[0]})
    assert sqnr_db(expected, actual) >= 40.0  # 46-48 dB measured vs the CPU EP on the same QDQ graph


def test_unplaceable_graph_is_one_line_naming_graph_and_ops_and_writes_nothing(tmp_path):
    path = save_graph([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [], tmp_path / "low_res.onnx")
    out = tmp_path / "ctx" / "low_res_ctx.onnx"
    with pytest.raises(BundleError) as info:
        generate_context(path, out, load_socs()["SM8650"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("graph low_res: no QNN context binary for SM8650: not placed on the HTP: Det x1")
    assert not list(out.parent.glob("*"))


def test_context_stage_records_each_soc_and_graph_in_the_manifest(qdq_conv, tmp_path):
    """The success path of the build's stage on a bundle whose quantized graph places: files under context/<SOC>/,
    returned as the manifest's context_binaries[soc][graph] record, which validate's lint and the hand-off README
    read."""
    from cw_export.quantize.qnn.context_binaries import context_stage
    from cw_export.bundle.handoff import _npu_section
    from cw_export.contract.manifest import list_files
    from cw_export.validate.lint import context_binaries_check

    qdq, _ = qdq_conv
    bundle = tmp_path / "bundle"
    (bundle / "graphs").mkdir(parents=True)
    shutil.copy(qdq, bundle / "graphs" / "high_res_out.onnx")
    io = {"inputs": [{"name": "x", "shape": [1, 4, 16, 16], "dtype": "float32"}],
          "outputs": [{"name": "y", "shape": [1, 8, 16, 16], "dtype": "float32"}]}
    manifest = {"graphs": {"high_res_out": {"file": "graphs/high_res_out.onnx", "precision": "w8a8", **io}},
                "session_options": session_config("basic")}
    table = context_stage(bundle, manifest, ("SM8650", "SM8550"))
    assert sorted(table) == ["SM8550", "SM8650"] and "context_binaries" not in manifest  # a record, not a write
    manifest["context_binaries"] = table  # as the bundle writer assembles it
    entry = table["SM8650"]["high_res_out"]
    assert entry["model"] == "context/SM8650/high_res_out_ctx.onnx"
    assert entry["binary"] == "context/SM8650/high_res_out_ctx_qnn.bin"
    assert (entry["soc_model"], entry["htp_arch"], entry["embed_mode"]) == (57, 75, 0)
    assert entry["qnn_sdk"] and entry["onnxruntime_qnn"]
    manifest["files"] = list_files(bundle)
    assert {entry["model"], entry["binary"]} <= set(manifest["files"])  # sha256 from the file list
    assert context_binaries_check(bundle, manifest).ok
    manifest.update(schedule={"steps": 1, "clock": 1}, wiring={"steps": {"full": ["high_res_out"], "clocked": []}})
    npu = _npu_section(bundle, manifest)  # the hand-off README's section on loading them
    assert "8-bit activations: 100.0% of the UNet's MACs" in npu  # the QDQ conv reads UINT8 activations
    assert f"`{entry['model']}`" in npu and f"`{entry['binary']}`" in npu and "| SM8550 |" in npu
    entry["binary"] = table["SM8550"]["high_res_out"]["binary"]  # a manifest pointing at another SoC's binary
    check = context_binaries_check(bundle, manifest)
    assert not check.ok and "EPContext points to 'high_res_out_ctx_qnn.bin'" in check.detail


def test_a_context_that_does_not_load_is_one_line(tmp_path):
    bad = tmp_path / "x_ctx.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"^context model x_ctx.onnx does not load on the QNN HTP: "):
        load_context(bad)


# -- the real bundle -----------------------------------------------------------------------------------------------
@contextmanager
def _one_torch_thread():
    """The builds here run torch on one thread; validating one of them re-measures its parity, so it must run the
    FP32 torch reference on the same thread count: another one moves the reference by float noise, which this
    deliberately low-parity bundle (25 dB, --allow-low-parity) turns into a guidance ratio 1.1e-3 off the recorded
    one (measured on one machine of this kind; the re-measure tolerance is 1e-3)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, cache: Path, socs: tuple[str, ...] = (), overwrite: bool = False, backend: str = "ort") -> Path:
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    recipe = (load_recipe("snapdragon-int8").with_build(steps=2, clock=2)
              .with_quantization(backend=backend, **SMALL).with_parity(heldout_prompts=1))
    with _one_torch_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("CW_EXPORT_CACHE", str(cache))
        return build_bundle(recipe, BuildOptions(model="tiny-random", out=out, progress=False, overwrite=overwrite,
                                                 allow_low_parity=True, socs=socs))


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def int8_bundle(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"ctx-bundle-{request.param}")
    bundle = _build(root / "bundle", root / "cache", backend=request.param)
    assert json.loads((bundle / "manifest.json").read_text())["recipe"]["quantization"]["backend"] == request.param
    return bundle


def _backend(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["recipe"]["quantization"]["backend"]


def test_bundle_graphs_record(int8_bundle, tmp_path):
    """Which of the INT8 bundle's quantized graphs compile to a context binary (EXPECTED, per backend); those that
    do load back and run once."""
    expected = EXPECTED[_backend(int8_bundle)]
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    quantized = sorted(n for n, g in manifest["graphs"].items() if g["precision"] != "fp32")
    outcome = {}
    for name in quantized:
        try:
            model, _ = generate_context(int8_bundle / manifest["graphs"][name]["file"],
                                        tmp_path / f"{name}_ctx.onnx", load_socs()["SM8650"],
                                        manifest["session_options"], name=name)
        except BundleError as exc:
            outcome[name] = str(exc)
            continue
        outcome[name] = None
        session = load_context(model)
        feeds = {s["name"]: np.zeros(s["shape"], dtype=s["dtype"]) for s in manifest["graphs"][name]["inputs"]}
        assert [o.shape for o in session.run(None, feeds)] == [tuple(s["shape"]) for s in
                                                                manifest["graphs"][name]["outputs"]]
    print(json.dumps(outcome, indent=1))  # the record, for the docs (pytest -s)
    assert set(outcome) == set(expected)
    for name, fragment in expected.items():
        if fragment is None:
            assert outcome[name] is None, outcome[name]
        else:
            assert outcome[name] is not None and fragment in outcome[name], outcome[name]
            assert outcome[name].startswith(f"graph {name}: no QNN context binary for SM8650: ")
            assert "\n" not in outcome[name]


def test_build_with_soc(int8_bundle, tmp_path):
    """--soc on the built-in model. ort: every graph compiles; the bundle lists each context model and binary with
    its sha256, validate checks them, and each loads and runs on the HTP. aimet: the first graph that does not
    place fails the build in one line; nothing is written, and an existing bundle at --out stays as it was."""
    from cw_export.contract.manifest import read_manifest, verify_bundle

    backend = _backend(int8_bundle)
    expected = EXPECTED[backend]
    out = tmp_path / "bundle"
    shutil.copytree(int8_bundle, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    cache = int8_bundle.parent / "cache"  # the fixture's calibration cache: only the quantization is redone
    if all(v is None for v in expected.values()):
        _build(out, cache, socs=("SM8650",), overwrite=True, backend=backend)
        manifest = read_manifest(out)
        assert verify_bundle(out, manifest) == []
        entries = manifest["context_binaries"]["SM8650"]
        assert set(entries) == set(expected)
        for name, entry in entries.items():
            assert entry["model"] in manifest["files"] and entry["binary"] in manifest["files"]
            session = load_context(out / entry["model"])
            feeds = {s["name"]: np.zeros(s["shape"], dtype=s["dtype"]) for s in manifest["graphs"][name]["inputs"]}
            assert len(session.run(None, feeds)) == len(manifest["graphs"][name]["outputs"])
        with _one_torch_thread():
            assert main(["validate", str(out)]) == 0
        return
    with pytest.raises(BundleError) as info:
        _build(out, cache, socs=("SM8650",), overwrite=True, backend=backend)
    message = str(info.value)
    assert "\n" not in message
    first = sorted(expected)[0]  # graphs are compiled in name order
    assert re.match(rf"^graph {first}: no QNN context binary for SM8650: .*{expected[first]}", message), message
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert not (out / CONTEXT_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "bundle"]  # no temporary folder left behind
