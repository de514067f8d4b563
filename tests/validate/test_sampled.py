"""``cw-export validate --provider qnn-htp --sample N`` (docs/qnn_htp.md "Sampled check"): each quantized graph of a
small built-in-model bundle runs on the emulated HTP on N of the parity gate's inputs and passes; a bundle whose
low_res graph had a weight perturbed (and every hash recomputed, so integrity and lint pass) fails on that graph
alone, with a message naming it; bad flags are one line and exit 2 before the bundle is read."""

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
from cw_export.models.pipeline import SHAPES_DIR

QUANTIZED = {"text_encoder", "high_res_in", "low_res", "adaptor", "high_res_out", "vae_decoder"}

needs_htp = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file(), reason="built-in weights absent")


@pytest.fixture(scope="module")
def htp_bundle(tmp_path_factory) -> Path:
    """The README's main job (built-in model, its learned adaptor, guidance 4, 8 steps, the recipe's calibration;
    4 of its 8 held-out prompts) without the 8-bit sweep (``--a8-sweep off``: ~30 s instead of ~10 min; every graph W8A16,
    the gate passes). Smaller calibration budgets fail the gate on this model (1 prompt x 4 samples: high_res_in
    15 dB), and a failing bundle cannot show that the sampled check passes."""
    pytest.importorskip("onnxruntime_qnn")
    import torch

    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    root = tmp_path_factory.mktemp("sampled")
    recipe = (load_recipe("snapdragon-int8").with_build(guidance_scale=4.0).with_quantization(a8_candidates=[])
              .with_parity(heldout_prompts=4))  # the recipe gates on 8; 4 keep this fixture's cost and labels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CW_EXPORT_CACHE", str(root / "cache"))
            return build_bundle(recipe, BuildOptions(model="builtin", out=root / "bundle", progress=False,
                                                     model_adaptor=True))
    finally:
        torch.set_num_threads(threads)


def _validate(bundle: Path, capsys, *flags: str) -> tuple[int, dict[str, str], str]:
    """Exit code, {check name: 'PASS detail' / 'FAIL detail'}, stderr."""
    capsys.readouterr()
    code = main(["validate", str(bundle), "--provider", "qnn-htp", *flags])
    captured = capsys.readouterr()
    lines = {}
    for line in captured.out.splitlines():
        if line[:4] in ("PASS", "FAIL"):
            name, _, detail = line[6:].partition("  ")
            lines[name.strip()] = f"{line[:4]} {detail.strip()}"
    return code, lines, captured.err


@pytest.mark.parametrize("flags, message", [
    (["--sample", "0"], "--sample must be >= 1, got 0"),
    (["--sample", "x"], "--sample must be an integer"),
    (["--workers", "0", "--sample", "2"], "--workers must be >= 1"),
])
def test_bad_numbers_are_one_line_exit_2(flags, message, tmp_path, capsys):
    code = main(["validate", str(tmp_path / "absent"), "--provider", "qnn-htp", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--sample", "4"], "--sample runs each graph on another provider (--provider qnn-htp)"),
    (["--provider", "cpu", "--sample", "4"], "--sample runs each graph on another provider"),
    (["--provider", "qnn-htp", "--workers", "2"], "--workers goes with --sample N"),
    (["--provider", "qnn-htp", "--json", "x.json"], "--json goes with --sample N"),
    (["--provider", "qnn-htp", "--graph", "low_res"], "--graph goes with --sample N"),
    (["--provider", "qnn-htp", "--sample", "4", "--record"], "a --sample run measures only graphs"),
    (["--provider", "qnn-htp", "--sample", "4", "--no-parity"], "cannot be combined with --no-parity"),
])
def test_sample_flag_combinations_are_one_line_exit_2_before_reading_the_bundle(flags, message, tmp_path, capsys):
    code = main(["validate", str(tmp_path / "absent"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_default_workers_fit_cores_and_memory(monkeypatch):
    from cw_export.models import memory_check
    from cw_export.validate import sampled

    manifest = {"graphs": {g: {"file": f"graphs/{g}.onnx"} for g in ("a", "b", "c")},
                "files": {f"graphs/{g}.onnx": {"size": 100 << 20} for g in ("a", "b", "c")}}
    per_worker = sampled.WORKER_BASE_BYTES + sampled.WORKER_BYTES_PER_GRAPH_BYTE * (100 << 20)
    monkeypatch.setattr(sampled.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for available, expected in ((None, 3), (10 * per_worker, 3), (2 * per_worker + 1, 2), (per_worker // 2, 1)):
        monkeypatch.setattr(memory_check, "available_memory_bytes", lambda: available)
        assert sampled.default_workers(Path("."), manifest, ["a", "b", "c"]) == expected, available


@needs_htp
@pytest.mark.slow  # a built-in bundle on the emulated HTP
def test_sampled_check_passes_on_every_quantized_graph(htp_bundle, tmp_path, capsys):
    report = tmp_path / "sampled.json"
    code, lines, err = _validate(htp_bundle, capsys, "--sample", "4", "--workers", "2", "--json", str(report))
    assert code == 0, (lines, err)
    numbers = json.loads(report.read_text())
    assert set(numbers["graphs"]) == QUANTIZED and numbers["passed"] and numbers["workers"] == 2
    for graph in QUANTIZED:
        assert lines[f"{graph} on qnn-htp (4 samples)"].startswith("PASS vs FP32 torch"), lines
        result = numbers["graphs"][graph]
        assert len(result["samples"]) == 4 and result["passed"]
        assert result["sqnr_vs_fp32_db"]["pooled"] >= result["min_sqnr_db"] > 0
        assert result["sqnr_vs_fp32_db"]["worst"] <= result["sqnr_vs_fp32_db"]["median"]
        assert result["sqnr_vs_cpu_db"]["worst"] >= 25.0, (graph, result["sqnr_vs_cpu_db"])
    # the gate's (prompt, step) pairs, first to last of the steps where the graph runs, a different prompt each
    assert [s["label"] for s in numbers["graphs"]["high_res_in"]["samples"]] == \
        ["prompt 0 step 1 (full)", "prompt 1 step 3 (full)", "prompt 2 step 5 (full)", "prompt 3 step 8 (clocked)"]
    assert [s["step"] for s in numbers["graphs"]["low_res"]["samples"]] == [0, 2, 4, 6]  # full steps only
    assert [s["step"] for s in numbers["graphs"]["adaptor"]["samples"]] == [1, 3, 5, 7]  # clocked steps only
    assert [s["label"] for s in numbers["graphs"]["text_encoder"]["samples"]] == [f"prompt {k}" for k in range(4)]
    # it ran on another backend: not bit-exact with the CPU EP somewhere
    assert any(s["sqnr_vs_cpu_db"] < 999.0 for r in numbers["graphs"].values() for s in r["samples"])
    assert lines["sampled qnn-htp check"].startswith("PASS 6 graphs x 4 samples")
    assert "not measured on qnn-htp in this mode: per-step latent PSNR" in lines["sampled qnn-htp check"]


def _perturb_weight(bundle: Path, graph: str) -> str:
    """Replace the largest integer weight initializer of ``graph`` by random values, then re-hash every file."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    path = bundle / manifest["graphs"][graph]["file"]
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    target = max(weights, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(target)
    rng = np.random.default_rng(0)
    noisy = rng.integers(np.iinfo(values.dtype).min, np.iinfo(values.dtype).max, values.shape, dtype=values.dtype)
    target.CopyFrom(numpy_helper.from_array(noisy, target.name))
    onnx.save(model, str(path))
    manifest["files"] = list_files(bundle)
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))
    return target.name


@needs_htp
@pytest.mark.slow  # a built-in bundle on the emulated HTP
def test_sampled_check_catches_a_perturbed_low_res_weight(htp_bundle, tmp_path, capsys):
    bundle = Path(shutil.copytree(htp_bundle, tmp_path / "bundle"))
    _perturb_weight(bundle, "low_res")
    assert main(["validate", str(bundle), "--no-parity"]) == 0  # hashes recomputed: only parity can tell
    code, lines, err = _validate(bundle, capsys, "--sample", "4", "--json", str(tmp_path / "broken.json"))
    assert code == 2 and err.count("\n") == 1, err
    assert "low_res on qnn-htp (4 samples)" in err and "sampled qnn-htp check" in err
    failing = lines["low_res on qnn-htp (4 samples)"]
    assert failing.startswith("FAIL SQNR vs FP32 torch") and "< the gate's 30 dB" in failing, failing
    assert "worst sample prompt" in failing and "CPU EP is below it" in failing  # broken on every provider
    assert lines["sampled qnn-htp check"].startswith("FAIL 1 graph(s) fail on qnn-htp: low_res")
    broken = json.loads((tmp_path / "broken.json").read_text())["graphs"]
    assert broken["low_res"]["sqnr_vs_fp32_db"]["pooled"] < 20.0 and not broken["low_res"]["passed"]
    for graph in QUANTIZED - {"low_res"}:  # only the broken graph fails
        assert lines[f"{graph} on qnn-htp (4 samples)"].startswith("PASS"), lines
        assert broken[graph]["passed"]


@needs_htp
@pytest.mark.slow  # the built-in bundle fixture
def test_a_failing_worker_fails_its_graph_with_one_line(htp_bundle, tmp_path):
    from cw_export.validate.sampled import run_workers

    inputs = tmp_path / "nope.in.npz"
    np.savez(inputs, **{"00000/input_ids": np.zeros((2, 77), np.int64)})
    runs = run_workers(htp_bundle, {"nope": inputs}, {"nope": 1}, "qnn-htp", 1, progress=False)
    assert runs["nope"].error == "KeyError: 'nope'" and not runs["nope"].done


@needs_htp
@pytest.mark.slow  # the built-in bundle fixture
def test_graph_flag_checks_only_the_named_graphs(htp_bundle, tmp_path, capsys):
    report = tmp_path / "one.json"
    code, lines, err = _validate(htp_bundle, capsys, "--sample", "4", "--graph", "low_res", "--json", str(report))
    assert code == 0, (lines, err)
    numbers = json.loads(report.read_text())
    assert set(numbers["graphs"]) == {"low_res"} and numbers["only"] == ["low_res"] and numbers["passed"]
    assert lines["low_res on qnn-htp (4 samples)"].startswith("PASS vs FP32 torch"), lines
    assert not any(f"{g} on qnn-htp" in name for g in QUANTIZED - {"low_res"} for name in lines), lines
    assert lines["sampled qnn-htp check"].startswith("PASS 1 graphs (--graph: 5 other graph(s) not checked)")


@needs_htp
@pytest.mark.slow  # the built-in bundle fixture
def test_graph_flag_with_an_unknown_graph_is_one_line_exit_2(htp_bundle, capsys):
    code, lines, err = _validate(htp_bundle, capsys, "--sample", "1", "--graph", "low_res", "--graph", "unet")
    assert code == 2 and err.count("\n") == 1 and not lines, (lines, err)
    assert "--graph unet: not a quantized graph of this bundle" in err and "low_res" in err, err
